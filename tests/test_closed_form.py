"""Closed-form maps recover known affine / orthogonal maps from streamed statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featmap_ray.mapping.closed_form import SufficientStats, fit_procrustes, fit_ridge

C, H, W = 6, 3, 4


def _affine_pairs(weight: np.ndarray, bias: np.ndarray, batches: int, seed: int = 0):
    """(x, y) batches with y = weight·x + bias at every position, float64, non-zero-mean x."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(batches):
        x = rng.normal(loc=2.0, scale=1.5, size=(5, C, H, W))
        y = np.einsum("oc,bchw->bohw", weight, x) + bias[None, :, None, None]
        out.append((torch.from_numpy(x), torch.from_numpy(y)))
    return out


def _rows(t: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) → (B·H·W, C) rows, written independently of the library."""
    return t.numpy().transpose(0, 2, 3, 1).reshape(-1, C)


def _known_affine(seed: int = 1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(C, C)), rng.normal(size=C)


def test_ridge_recovers_affine_map():
    a, b = _known_affine()
    stats = SufficientStats(C)
    for x, y in _affine_pairs(a, b, batches=3):
        stats.update(x, y)
    weight, bias = fit_ridge(stats, gamma=1e-10)
    np.testing.assert_allclose(weight.numpy(), a, atol=1e-6)
    np.testing.assert_allclose(bias.numpy(), b, atol=1e-6)


def test_merged_stats_equal_one_shot():
    a, b = _known_affine()
    pairs = _affine_pairs(a, b, batches=4)
    one_shot = SufficientStats(C).update(torch.cat([x for x, _ in pairs]), torch.cat([y for _, y in pairs]))
    left, right = SufficientStats(C), SufficientStats(C)
    for x, y in pairs[:1]:
        left.update(x, y)
    for x, y in pairs[1:]:
        right.update(x, y)
    merged = SufficientStats.from_dict(left.merge(right).to_dict())  # also round-trips through numpy
    assert merged.n == one_shot.n == 4 * 5 * H * W
    for field in ("sum_x", "sum_y", "xtx", "xty"):
        np.testing.assert_allclose(getattr(merged, field).numpy(), getattr(one_shot, field).numpy(), rtol=1e-12)
    for got, want in zip(fit_ridge(merged, 1e-10), fit_ridge(one_shot, 1e-10)):
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-9)


def test_ridge_matches_numpy_closed_form_with_penalty():
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.normal(1.0, 1.0, size=(4, C, H, W)))
    y = torch.from_numpy(rng.normal(-0.5, 2.0, size=(4, C, H, W)))
    gamma = 7.5
    xr, yr = _rows(x), _rows(y)
    xc, yc = xr - xr.mean(0), yr - yr.mean(0)
    w_in_out = np.linalg.solve(xc.T @ xc + gamma * np.eye(C), xc.T @ yc)
    weight, bias = fit_ridge(SufficientStats(C).update(x, y), gamma)
    np.testing.assert_allclose(weight.numpy(), w_in_out.T, atol=1e-10)
    np.testing.assert_allclose(bias.numpy(), yr.mean(0) - w_in_out.T @ xr.mean(0), atol=1e-10)


def test_procrustes_recovers_orthogonal_map_and_offset():
    rng = np.random.default_rng(4)
    q, _ = np.linalg.qr(rng.normal(size=(C, C)))
    offset = rng.normal(size=C)
    stats = SufficientStats(C)
    for x, y in _affine_pairs(q, offset, batches=2):
        stats.update(x, y)
    weight, bias = fit_procrustes(stats)
    np.testing.assert_allclose(weight.numpy(), q, atol=1e-9)
    np.testing.assert_allclose(bias.numpy(), offset, atol=1e-9)
    np.testing.assert_allclose(weight.numpy() @ weight.numpy().T, np.eye(C), atol=1e-12)


def test_stats_reject_bad_input():
    stats = SufficientStats(C)
    good = torch.zeros(2, C, H, W)
    with pytest.raises(ValueError, match="differ"):
        stats.update(good, torch.zeros(2, C, H, W + 1))
    with pytest.raises(ValueError, match=r"\(B, 6, H, W\)"):
        stats.update(torch.zeros(2, C + 1, H, W), torch.zeros(2, C + 1, H, W))
    bad = good.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="y: contains NaN"):
        stats.update(good, bad)
    assert stats.n == 0  # nothing half-added
    with pytest.raises(ValueError, match="no rows"):
        fit_ridge(stats)
    with pytest.raises(ValueError, match="channels"):
        stats.merge(SufficientStats(C + 1))
    with pytest.raises(ValueError, match="gamma"):
        fit_ridge(stats.update(good, good), gamma=-1.0)
    with pytest.raises(ValueError, match="missing keys"):
        SufficientStats.from_dict({"channels": C})


def test_unpenalised_ridge_on_rank_deficient_rows_is_a_clear_error():
    x = torch.ones(2, C, H, W)  # every row equal: XcᵀXc = 0
    with pytest.raises(ValueError, match="singular"):
        fit_ridge(SufficientStats(C).update(x, x), gamma=0.0)
