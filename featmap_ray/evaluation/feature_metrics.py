"""Feature-space metrics of a mapped feature map against the true target feature map.

The cosine is taken per spatial position ("superpixel": the C-vector at one of the H·W
positions), as in the FeatMap loss and evaluation, then summarised per sample.
"""

from __future__ import annotations

import numpy as np
import torch

EPS = 1e-8


def _check(name: str, x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim != 4:
        raise ValueError(f"{name}: expected a feature map batch [B, C, H, W], got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return x


def position_cosine(pred: torch.Tensor, target: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Cosine between pred and target at every position: [B, C, H, W] x 2 -> [B, H*W].
    Each norm is clamped to eps (as torch.nn.functional.cosine_similarity), so a zero vector
    gets cosine 0."""
    pred, target = pred.flatten(2), target.flatten(2)
    dot = (pred * target).sum(1)
    return dot / (pred.norm(dim=1).clamp_min(eps) * target.norm(dim=1).clamp_min(eps))


def feature_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-sample metrics of pred vs target ([B, C, H, W] each), as float64 arrays of length B:

    - cos_median: median over the H·W positions of the per-position cosine. numpy's median: the
      mean of the two middle values when H·W is even (the reference's torch.median takes the
      lower one, the training loss the upper one; all agree for odd H·W such as 9x9);
    - cos_mean: mean over positions;
    - cos_q05: 5 % quantile over positions (numpy's default linear interpolation);
    - mse: mean squared error over C, H and W.

    Computed in float64 on the inputs' device.
    """
    pred, target = _check("pred", pred), _check("target", target)
    if pred.shape != target.shape:
        raise ValueError(f"pred has shape {tuple(pred.shape)} but target has shape {tuple(target.shape)}; expected equal")
    pred, target = pred.double(), target.double()
    cos = position_cosine(pred, target).cpu().numpy()
    mse = (pred - target).pow(2).flatten(1).mean(1).cpu().numpy()
    return {
        "cos_median": np.median(cos, axis=1),
        "cos_mean": cos.mean(axis=1),
        "cos_q05": np.quantile(cos, 0.05, axis=1),
        "mse": mse,
    }


def summarise(per_sample: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean over samples of every per-sample metric, plus n_samples. The run-level "median
    cosine" is thus the mean of the per-sample medians, as in the paper."""
    if not per_sample:
        raise ValueError("per_sample: expected at least one metric, got an empty dict")
    lengths = {key: len(np.asarray(values)) for key, values in per_sample.items()}
    if len(set(lengths.values())) != 1 or 0 in lengths.values():
        raise ValueError(f"per_sample: expected non-empty arrays of equal length, got lengths {lengths}")
    summary = {key: float(np.mean(values)) for key, values in per_sample.items()}
    summary["n_samples"] = next(iter(lengths.values()))
    return summary
