"""Closed-form affine maps y ≈ W x + b fitted from streamed sufficient statistics.

Rows are superpixel vectors: every (image, position) of a (B, C, H, W) batch is one row of
dimension C. The full row matrix (N·H·W rows) does not fit in memory at scale, so workers
accumulate `SufficientStats` per shard, `merge` them, and the fit reads only the C×C moments.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

_FIELDS = ("sum_x", "sum_y", "xtx", "xty")


def _rows(t: Tensor, name: str, channels: int) -> Tensor:
    if t.ndim != 4 or t.shape[1] != channels:
        raise ValueError(f"{name}: expected a (B, {channels}, H, W) feature map, got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: contains NaN or Inf values")
    return t.detach().movedim(1, -1).reshape(-1, channels).double()


class SufficientStats:
    """Row count, sums and raw cross-moments of (x, y) superpixel pairs, in float64.

    float64 makes the centring XᵀX − n x̄x̄ᵀ accurate for feature-scale values (relative error
    about 1e-16 · |x̄|² / var, negligible for normalised or raw backbone features).
    """

    def __init__(self, channels: int):
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"SufficientStats: channels must be a positive int, got {channels!r}")
        self.channels = channels
        self.n = 0
        self.sum_x = torch.zeros(channels, dtype=torch.float64)
        self.sum_y = torch.zeros(channels, dtype=torch.float64)
        self.xtx = torch.zeros(channels, channels, dtype=torch.float64)
        self.xty = torch.zeros(channels, channels, dtype=torch.float64)

    def update(self, x: Tensor, y: Tensor) -> SufficientStats:
        """Add the H·W position rows of every image in a (B, C, H, W) pair of batches."""
        if x.shape != y.shape:
            raise ValueError(f"SufficientStats.update: x {tuple(x.shape)} and y {tuple(y.shape)} differ")
        xr, yr = _rows(x, "x", self.channels), _rows(y, "y", self.channels)
        # The matmuls run on the input's device (GPU if any); only C and C×C results move.
        self.n += xr.shape[0]
        self.sum_x += xr.sum(0).cpu()
        self.sum_y += yr.sum(0).cpu()
        self.xtx += (xr.T @ xr).cpu()
        self.xty += (xr.T @ yr).cpu()
        return self

    def merge(self, other: SufficientStats) -> SufficientStats:
        """Add another accumulator (e.g. from another Ray worker) into this one."""
        if other.channels != self.channels:
            raise ValueError(f"SufficientStats.merge: channels {other.channels} != {self.channels}")
        self.n += other.n
        for field in _FIELDS:
            getattr(self, field).add_(getattr(other, field))
        return self

    def mean_x(self) -> Tensor:
        return self.sum_x / self._require_rows()

    def mean_y(self) -> Tensor:
        return self.sum_y / self._require_rows()

    def centred(self) -> tuple[Tensor, Tensor]:
        """(XcᵀXc, XcᵀYc): the moments of the mean-centred rows."""
        mx, my = self.mean_x(), self.mean_y()
        return self.xtx - self.n * torch.outer(mx, mx), self.xty - self.n * torch.outer(mx, my)

    def _require_rows(self) -> int:
        if self.n == 0:
            raise ValueError("SufficientStats: no rows accumulated (call update first)")
        return self.n

    def to_dict(self) -> dict[str, Any]:
        """Plain numpy arrays (for Ray object refs, np.savez, pickling)."""
        out: dict[str, Any] = {"channels": self.channels, "n": np.int64(self.n)}
        out.update({field: getattr(self, field).numpy().copy() for field in _FIELDS})
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SufficientStats:
        missing = {"channels", "n", *_FIELDS} - set(data)
        if missing:
            raise ValueError(f"SufficientStats.from_dict: missing keys {sorted(missing)}")
        stats = cls(int(data["channels"]))
        stats.n = int(data["n"])
        for field in _FIELDS:
            value = torch.as_tensor(np.asarray(data[field]), dtype=torch.float64)
            expected = getattr(stats, field).shape
            if value.shape != expected:
                raise ValueError(f"SufficientStats.from_dict: {field} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(expected)}")
            setattr(stats, field, value.clone())
        return stats


def fit_ridge(stats: SufficientStats, gamma: float = 1.0) -> tuple[Tensor, Tensor]:
    """Ridge regression on centred rows: W = ((XcᵀXc + γI)⁻¹ XcᵀYc)ᵀ, b = ȳ − W x̄.

    Returns float64 (W [C_out, C_in], b [C_out]) with y ≈ W x + b; the intercept is not penalised.
    """
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"fit_ridge: gamma must be a finite number >= 0, got {gamma!r}")
    cxx, cxy = stats.centred()
    lhs = cxx + gamma * torch.eye(stats.channels, dtype=torch.float64)
    try:
        w_in_out = torch.linalg.solve(lhs, cxy)
    except torch.linalg.LinAlgError as exc:
        raise ValueError(f"fit_ridge: XcᵀXc + {gamma}·I is singular ({exc}); use gamma > 0") from exc
    weight = w_in_out.T.contiguous()
    return weight, stats.mean_y() - weight @ stats.mean_x()


def fit_procrustes(stats: SufficientStats) -> tuple[Tensor, Tensor]:
    """Orthogonal Procrustes: R = U Vᵀ from the SVD XcᵀYc = UΣVᵀ, prediction (x − x̄)ᵀR + ȳ.

    Returns float64 (W = Rᵀ [C_out, C_in], b = ȳ − W x̄). Unlike the reference, which predicts
    x R with no intercept, the means are added back: an orthogonal map alone cannot move the
    mean, so without them any manipulation that shifts the mean feature would be unfittable.
    """
    _, cxy = stats.centred()
    u, _, vh = torch.linalg.svd(cxy)
    weight = (u @ vh).T.contiguous()
    return weight, stats.mean_y() - weight @ stats.mean_x()
