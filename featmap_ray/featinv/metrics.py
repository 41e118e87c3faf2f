"""Per-image reconstruction metrics (FeatInv paper §4.1): feature-map cosine and classifier agreement.

- cos_median_lower: cosine between the source feature map and the reconstruction's feature map
  (the reconstruction resized bilinearly to the backbone's input size) at every position, then
  the median over positions, rule "lower" (`torch.median`: the lower middle value for an even
  count, as the reference evaluation): `featmap_ray.cosine.median_cosine(..., "lower")`.
- top-1 / top-5(1) match: the source image's top-1 class is the reconstruction's top-1 / among its top-5.

`BackboneProbe` looks at images through the backbone (feature maps, logits); FID over sets of
images is in `fid.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from featmap_ray import backbones
from featmap_ray.config import BackboneRequest


def classifier_agreement(source_logits: torch.Tensor,
                         logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(source top-1 class, top-1 match, top-5(1) match) per row."""
    source_top1 = source_logits.argmax(dim=1)
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return source_top1, top5[:, 0] == source_top1, (top5 == source_top1[:, None]).any(dim=1)


def resize_pixels(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, size, size) in [0, 1], bilinear (antialiased when shrinking)."""
    x = pixels.permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp_(0, 1)


def _normalise(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    mean_, std_ = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (mean, std))
    return (x - mean_) / std_


class BackboneProbe:
    """A backbone looked at one layer: feature maps and (if it has a classifier head) logits of images."""

    def __init__(self, request: BackboneRequest, layer: str, device: torch.device | str = "cpu"):
        self.spec = backbones.get_spec(request.name)
        self.layer = backbones.resolve_layers(self.spec, [layer])[0]
        self.model = backbones.build_model(self.spec, request, device)
        self.device = torch.device(device)
        self.has_classifier = not self.spec.features_only and getattr(self.model, "num_classes", 0) > 0

    def inputs(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) of any size -> the backbone's normalised input, resized bilinearly."""
        x = resize_pixels(pixels.to(self.device), self.spec.input_size)
        return _normalise(x, self.spec.mean, self.spec.std)

    @torch.inference_mode()
    def features(self, pixels: torch.Tensor, layer: str | None = None) -> torch.Tensor:
        layer = layer or self.layer
        return backbones.forward_taps(self.model, self.spec, [layer], self.inputs(pixels))[layer].float()

    @torch.inference_mode()
    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        if not self.has_classifier:
            raise ValueError(f"backbone {self.spec.name} has no classifier head")
        return self.model(self.inputs(pixels)).float()
