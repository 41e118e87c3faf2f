"""Feature-space metrics of a mapped feature map against the true target feature map.

The cosine is taken per spatial position ("superpixel": the C-vector at one of the H·W
positions) with `featmap_ray.cosine.position_cosine`, the definition of the FeatMap loss, then
summarised per sample. The median follows the rule of the loss and of the training's validation
metric ("upper"), so the three are comparable; the column name says so.
"""

from __future__ import annotations

import numpy as np
import torch

from featmap_ray.cosine import median_of_positions, position_cosine


def _check(name: str, x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim != 4:
        raise ValueError(f"{name}: expected a feature map batch [B, C, H, W], got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return x


def feature_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-sample metrics of pred vs target ([B, C, H, W] each), as float64 arrays of length B:

    - cos_median_upper: median over the H·W positions of the per-position cosine (as the loss:
      each vector divided by max(‖v‖, 1e-8), the cosine clamped to ±(1 − 1e-8)), rule "upper":
      element ⌊H·W/2⌋ of the ascending cosines, the upper middle value when H·W is even (as the
      training loss `median_cos` and the validation metric; FeatInv's torch.median takes the
      lower one, numpy the mean of the two; all agree for odd H·W such as 9x9);
    - cos_mean: mean over positions;
    - cos_q05: 5 % quantile over positions (numpy's default linear interpolation);
    - mse: mean squared error over C, H and W.

    Computed in float64 on the inputs' device.
    """
    pred, target = _check("pred", pred), _check("target", target)
    if pred.shape != target.shape:
        raise ValueError(f"pred has shape {tuple(pred.shape)} but target has shape {tuple(target.shape)}; expected equal")
    pred, target = pred.double(), target.double()
    cos = position_cosine(pred, target)
    median = median_of_positions(cos, "upper").cpu().numpy()
    cos = cos.cpu().numpy()
    mse = (pred - target).pow(2).flatten(1).mean(1).cpu().numpy()
    return {
        "cos_median_upper": median,
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
