"""Per-position cosine between two feature maps, and its median over positions with an explicit rule.

A "position" (superpixel) is the C-vector at one of the H·W places of a (B, C, H, W) map. The
papers summarise the H·W cosines of an image by their median, but not with one rule:

- ``upper``: element ⌊H·W/2⌋ of the ascending cosines — the FeatMap training loss (the reference's
  ``eval_helpers.py``); for even H·W the upper of the two middle values.
- ``lower``: ``torch.median`` — the FeatInv metrics and FeatMap's reconstruction metrics; for even
  H·W the lower middle value.
- ``mean``: numpy's median, the mean of the two middle values for even H·W.

All three agree for odd H·W (ConvNeXt stage3's 9×9, ResNet's 7×7) and differ for even H·W
(SwinV2's 12², DINOv3's 14², ConvNeXt stage0–2's 72², 36², 18²).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-8
RULES = ("upper", "lower", "mean")


def position_cosine(a: Tensor, b: Tensor, eps: float = EPS) -> Tensor:
    """(B, C, H, W) × 2 -> (B, H·W): the cosine of the C-vectors at every position.

    Each vector is divided by max(‖v‖, eps) (as ``F.cosine_similarity``), so a zero vector gets
    cosine 0, and the result is clamped to [−1 + eps, 1 − eps] (the reference's loss; in float32
    the upper bound rounds to 1)."""
    if a.ndim != 4 or a.shape != b.shape:
        raise ValueError(f"position_cosine: expected two (B, C, H, W) maps of the same shape, "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")
    a = F.normalize(a.flatten(2), dim=1, eps=eps)
    b = F.normalize(b.flatten(2), dim=1, eps=eps)
    return (a * b).sum(1).clamp(-1 + eps, 1 - eps)


def median_of_positions(cos: Tensor, rule: str) -> Tensor:
    """(B, N) -> (B,): the median of each row under `rule` (see the module docstring)."""
    if rule not in RULES:
        raise ValueError(f"median rule must be one of {RULES}, got {rule!r}")
    n = cos.shape[1]
    if rule == "upper":
        return torch.kthvalue(cos, n // 2 + 1, dim=1).values  # kthvalue's k is 1-based
    if rule == "lower":
        return cos.median(dim=1).values
    ordered = cos.sort(dim=1).values
    return (ordered[:, (n - 1) // 2] + ordered[:, n // 2]) / 2


def median_cosine(a: Tensor, b: Tensor, rule: str) -> Tensor:
    """(B, C, H, W) × 2 -> (B,): the median over positions of the per-position cosine, by `rule`."""
    return median_of_positions(position_cosine(a, b), rule)
