"""FID between the source images and their reconstructions (FeatInv paper §4.1), over sets of images.

Fréchet distance between Gaussians fitted to feature vectors of the two sets, by torchmetrics'
`FrechetInceptionDistance` (`fid`), fed the feature vectors that the job's actors compute with a
`FidExtractor`: torchvision's Inception-v3 pool (2048-d) when a local weight file is given
("fid_inception"; not the TF-Inception of pytorch-fid, so numbers are close to, not equal to,
published FIDs), else the backbone's globally pooled final map ("fid_backbone:<name>/<layer>").
Per-image metrics are in `metrics.py`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from featmap_ray import backbones
from featmap_ray.featinv.metrics import BackboneProbe, resize_pixels

INCEPTION = "fid_inception"


class _GivenFeatures(nn.Module):
    """The feature network of a FrechetInceptionDistance fed feature vectors the caller computed."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features  # read by torchmetrics instead of a forward on a dummy image

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _feature_set(name: str, features: np.ndarray) -> torch.Tensor:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"fid: {name}: expected (N >= 2, D) feature vectors, got shape {features.shape}")
    if not np.isfinite(features).all():
        raise ValueError(f"fid: {name}: contains NaN or infinite values")
    return torch.from_numpy(features)


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
    """FID between two sets of feature vectors (N, D) and (M, D): torchmetrics' FrechetInceptionDistance
    fed the vectors (source as "real"), in float64. Its distance is ||μ1 − μ2||² + Tr(Σ1) + Tr(Σ2)
    − 2·Σ√λ_i(Σ1 Σ2) with unbiased covariances (the eigenvalue form of Tr (Σ1 Σ2)^½, which needs no
    guard for the singular covariances of fewer vectors than dimensions)."""
    # ~2 s to import: only where FID is computed.
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = _feature_set("source", source), _feature_set("reconstructions", reconstructions)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"fid: source has {real.shape[1]}-d features, reconstructions {fake.shape[1]}-d")
    metric = FrechetInceptionDistance(feature=_GivenFeatures(real.shape[1]))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())
