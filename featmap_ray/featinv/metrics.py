"""Reconstruction metrics (FeatInv paper §4.1): feature-map cosine, classifier agreement, FID.

- cosine: cosine between the source feature map and the reconstruction's feature map (the
  reconstruction resized bilinearly to the backbone's input size) at every position, then the
  median over positions (`torch.median`: the lower middle value for an even count, as the
  reference evaluation).
- top-1 / top-5(1) match: the source image's top-1 class is the reconstruction's top-1 / among its top-5.
- FID: Fréchet distance between Gaussians fitted to features of the source images and of the
  reconstructions. Features: torchvision's Inception-v3 pool (2048-d) when a local weight file is
  given ("fid_inception"; not the TF-Inception of pytorch-fid, so numbers are close to, not equal
  to, published FIDs), else the backbone's globally pooled final map ("fid_backbone:<name>/<layer>").
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from torch import nn

from featmap_ray import backbones
from featmap_ray.config import BackboneRequest

INCEPTION = "fid_inception"


def median_cosine(source: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) × 2 -> (N,): median over the H·W positions of the per-position cosine similarity."""
    if source.shape != other.shape:
        raise ValueError(f"median_cosine: feature maps differ in shape, {tuple(source.shape)} vs {tuple(other.shape)}")
    cos = F.cosine_similarity(source.float(), other.float(), dim=1)
    return cos.flatten(1).median(dim=1).values


def classifier_agreement(source_logits: torch.Tensor,
                         logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(source top-1 class, top-1 match, top-5(1) match) per row."""
    source_top1 = source_logits.argmax(dim=1)
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return source_top1, top5[:, 0] == source_top1, (top5 == source_top1[:, None]).any(dim=1)


def activation_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of N feature vectors (N, D)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"activation_statistics: expected (N >= 2, D) features, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """||μ1 − μ2||² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½), the FID formula."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"frechet_distance: shapes do not match: mu {mu1.shape} / {mu2.shape}, "
                         f"sigma {sigma1.shape} / {sigma2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("error", linalg.LinAlgWarning)
        try:
            covmean = linalg.sqrtm(sigma1 @ sigma2)
        except linalg.LinAlgWarning:  # singular, e.g. fewer samples than dimensions
            covmean = np.full_like(sigma1, np.nan)
    if not np.isfinite(covmean).all():
        # The usual guard (pytorch-fid): offset both diagonals by eps.
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"frechet_distance: matrix square root has an imaginary component "
                             f"{np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


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


class FidExtractor:
    """Images -> FID feature vectors; `name` says which network made them."""

    def __init__(self, name: str, embed):
        self.name = name
        self._embed = embed

    def __call__(self, pixels: torch.Tensor) -> np.ndarray:
        """uint8 (N, H, W, 3) -> (N, D) float64."""
        with torch.inference_mode():
            return self._embed(pixels).double().cpu().numpy()


def inception_extractor(weights: str | Path, device: torch.device | str = "cpu") -> FidExtractor:
    """torchvision Inception-v3 (a local state dict, e.g. inception_v3_google-0cc3c7bd.pth) -> 2048-d pool features."""
    from torchvision.models import inception_v3

    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"featinv.eval.fid_inception_weights: no such file {path} (a torchvision "
                                "Inception-v3 state dict, e.g. inception_v3_google-0cc3c7bd.pth)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    aux = any(k.startswith("AuxLogits.") for k in state)
    # transform_input=False + inputs scaled to [-1, 1]: what transform_input=True does to ImageNet-normalised input.
    model = inception_v3(weights=None, aux_logits=aux, transform_input=False, init_weights=False)
    model.load_state_dict(state)
    model.fc = nn.Identity()
    model = model.eval().to(device)

    def embed(pixels: torch.Tensor) -> torch.Tensor:
        x = resize_pixels(pixels.to(device), 299)
        return model(_normalise(x, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))

    return FidExtractor(INCEPTION, embed)


def backbone_extractor(probe: BackboneProbe) -> FidExtractor:
    """The backbone's final feature map, averaged over positions."""
    final = list(probe.spec.taps)[-1]
    return FidExtractor(fid_extractor_name(None, probe.spec),
                        lambda pixels: probe.features(pixels, final).mean(dim=(2, 3)))


def fid_extractor_name(inception_weights: str | None, spec: backbones.BackboneSpec) -> str:
    return INCEPTION if inception_weights else f"fid_backbone:{spec.name}/{list(spec.taps)[-1]}"


def fid_extractor(inception_weights: str | None, probe: BackboneProbe) -> FidExtractor:
    if inception_weights:
        return inception_extractor(inception_weights, probe.device)
    return backbone_extractor(probe)


def fid(source: np.ndarray, reconstructions: np.ndarray) -> float:
    """FID between two sets of feature vectors (N, D) and (M, D)."""
    return frechet_distance(*activation_statistics(source), *activation_statistics(reconstructions))
