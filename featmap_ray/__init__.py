"""featmap-ray: the FeatMap / FeatInv study as a distributed, resumable pipeline on Ray, Lance and MLflow."""

__version__ = "0.1.0"
