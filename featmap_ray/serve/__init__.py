"""FeatInv as a service: a Ray Serve application (ingress + backbone, FeatInv and mapping deployments)."""
