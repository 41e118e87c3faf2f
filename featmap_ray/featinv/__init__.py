"""FeatInv: a ControlNet on Stable Diffusion that turns a backbone's feature map back into an image."""
