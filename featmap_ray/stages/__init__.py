"""One module per `featmap` command: the Ray adapters around the domain code."""
