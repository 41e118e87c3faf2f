"""FID between the source images and their reconstructions (FeatInv paper §4.1), over sets of images.

Fréchet distance between Gaussians fitted to feature vectors of the two sets. Features:
torchvision's Inception-v3 pool (2048-d) when a local weight file is given ("fid_inception"; not the
TF-Inception of pytorch-fid, so numbers are close to, not equal to, published FIDs), else the
backbone's globally pooled final map ("fid_backbone:<name>/<layer>"). Per-image metrics are in
`metrics.py`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from scipy import linalg
from torch import nn

from featmap_ray import backbones
from featmap_ray.featinv.metrics import BackboneProbe, resize_pixels

INCEPTION = "fid_inception"


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
    # transform_input=False, inputs in [-1, 1] (embed): what transform_input=True makes of ImageNet-normalised input.
    model = inception_v3(weights=None, aux_logits=aux, transform_input=False, init_weights=False)
    model.load_state_dict(state)
    model.fc = nn.Identity()
    model = model.eval().to(device)

    def embed(pixels: torch.Tensor) -> torch.Tensor:
        return model(resize_pixels(pixels.to(device), 299) * 2 - 1)

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
