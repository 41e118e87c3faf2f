"""Mapping losses against independent numpy definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from featmap_ray.mapping.losses import (
    LOSSES,
    PAPER_LOSS,
    build_loss,
    ntxent_negatives,
)


def _pair(shape=(3, 5, 4, 6), seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=shape).astype(np.float64), rng.normal(size=shape).astype(np.float64)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a)


def np_rows(a: np.ndarray) -> np.ndarray:
    """(B, C, H, W) → (B·H·W, C), unit-normalised with eps 1e-8."""
    rows = a.transpose(0, 2, 3, 1).reshape(-1, a.shape[1])
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-8)


def np_cos(p: np.ndarray, t: np.ndarray) -> np.ndarray:
    """(B, H·W) per-position cosines."""
    b = p.shape[0]
    return np.clip((np_rows(p) * np_rows(t)).sum(1).reshape(b, -1), -1 + 1e-8, 1 - 1e-8)


def np_adaptive_pool(a: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """torch's adaptive average pooling bins: [floor(i·H/out), ceil((i+1)·H/out))."""
    h, w = a.shape[-2:]
    out = np.empty(a.shape[:-2] + (out_h, out_w))
    for i in range(out_h):
        for j in range(out_w):
            rows = slice(math.floor(i * h / out_h), math.ceil((i + 1) * h / out_h))
            cols = slice(math.floor(j * w / out_w), math.ceil((j + 1) * w / out_w))
            out[..., i, j] = a[..., rows, cols].mean(axis=(-2, -1))
    return out


def np_median_cos(p, t):
    cos = np.sort(np_cos(p, t), axis=1)
    return 1 - cos[:, cos.shape[1] // 2].mean()


def np_huber(p, t, delta):
    d = np.abs(p - t)
    return np.where(d < delta, 0.5 * d**2 / delta, d - 0.5 * delta).mean()


def np_trimmed_cos(p, t, frac):
    cos = np.sort(np_cos(p, t), axis=1)
    drop = int(np.floor(frac * cos.shape[1]))
    return 1 - cos[:, drop:cos.shape[1] - drop].mean()


def np_ntxent(p, t, temperature, negatives=None):
    """InfoNCE with logits cos/τ; all other rows as negatives, or the given shared rows minus self."""
    pn, tn = np_rows(p), np_rows(t)
    n = pn.shape[0]
    losses = []
    for i in range(n):
        others = [j for j in (range(n) if negatives is None else negatives) if j != i]
        logits = np.array([pn[i] @ tn[i]] + [pn[i] @ tn[j] for j in others]) / temperature
        losses.append(-(logits[0] - np.log(np.exp(logits).sum())))
    return np.mean(losses)


@pytest.mark.parametrize(("name", "options", "reference"), [
    ("mse", {}, lambda p, t: ((p - t) ** 2).mean()),
    ("huber", {}, lambda p, t: np_huber(p, t, 1.0)),
    ("huber", {"delta": 0.4}, lambda p, t: np_huber(p, t, 0.4)),
    ("median_cos", {}, np_median_cos),
    ("mean_cos", {}, lambda p, t: 1 - np_cos(p, t).mean()),
    ("trimmed_cos", {}, lambda p, t: np_trimmed_cos(p, t, 0.25)),
    ("trimmed_cos", {"trim_frac": 0.1}, lambda p, t: np_trimmed_cos(p, t, 0.1)),
    ("patch_mse", {}, lambda p, t: ((np_adaptive_pool(p, 2, 2) - np_adaptive_pool(t, 2, 2)) ** 2).mean()),
    ("patch_mse", {"patch_size": 3}, lambda p, t: ((np_adaptive_pool(p, 3, 3) - np_adaptive_pool(t, 3, 3)) ** 2).mean()),
    ("ntxent", {"temperature": 0.1}, lambda p, t: np_ntxent(p, t, 0.1)),
    ("ntxent", {"temperature": 0.5, "num_negatives": 2 * 9 * 10 - 1}, lambda p, t: np_ntxent(p, t, 0.5)),
])
def test_loss_matches_numpy(name, options, reference):
    # 9×10: odd H, non-divisible W for patch_mse; huber inputs straddle delta.
    p, t = _pair(shape=(2, 4, 9, 10), seed=1)
    got = LOSSES[name](_t(p), _t(t), **options)
    assert got.ndim == 0
    np.testing.assert_allclose(got.item(), reference(p, t), rtol=1e-9, atol=1e-12)


def test_ntxent_with_sampled_negatives_matches_numpy():
    p, t = _pair(shape=(2, 4, 3, 3), seed=2)  # 18 rows
    rows, k = 18, 7
    negatives = ntxent_negatives(rows, k, torch.Generator().manual_seed(5))
    assert negatives.shape == (k,) and len(set(negatives.tolist())) == k
    got = LOSSES["ntxent"](_t(p), _t(t), temperature=0.2, num_negatives=k,
                           generator=torch.Generator().manual_seed(5))
    np.testing.assert_allclose(got.item(), np_ntxent(p, t, 0.2, negatives.tolist()), rtol=1e-9)


def test_ntxent_seeded_loss_is_reproducible():
    p, t = (_t(a).float() for a in _pair(shape=(2, 4, 3, 3), seed=2))
    first = build_loss("ntxent", {"ntxent": {"num_negatives": 4}}, seed=3)
    second = build_loss("ntxent", {"ntxent": {"num_negatives": 4}}, seed=3)
    values = [first(p, t).item() for _ in range(3)]
    assert values == [second(p, t).item() for _ in range(3)]
    assert len(set(values)) > 1  # a fresh draw per call


def test_median_cos_uses_upper_middle_for_even_positions():
    # 2×2 positions with cosines −0.5, 0.1, 0.6, 0.9: lower middle 0.1, upper 0.6, mean 0.35.
    angles = np.arccos([[-0.5, 0.1], [0.6, 0.9]])
    pred = np.stack([np.cos(angles), np.sin(angles)])[None]  # (1, 2, 2, 2)
    target = np.stack([np.ones((2, 2)), np.zeros((2, 2))])[None]
    pred_t = _t(pred).requires_grad_(True)
    loss = LOSSES["median_cos"](pred_t, _t(target))
    assert loss.item() == pytest.approx(1 - 0.6, abs=1e-12)
    loss.backward()
    # Only the median position (row 1, col 0) receives gradient.
    grad_norm = pred_t.grad[0].norm(dim=0)
    assert grad_norm[1, 0] > 0 and grad_norm.sum() == grad_norm[1, 0]


def test_median_cos_per_image_is_the_upper_middle_on_random_maps():
    p, t = _pair(seed=4)  # 4×6 = 24 positions: upper middle, unlike np.median / Tensor.median
    cos = np.sort(np_cos(p, t), axis=1)
    for i in range(len(p)):  # one image at a time: the loss is 1 − that image's median
        got = LOSSES["median_cos"](_t(p[i:i + 1]), _t(t[i:i + 1])).item()
        assert got == pytest.approx(1 - cos[i, 12], abs=1e-12)
        assert got != pytest.approx(1 - np.median(cos[i]), abs=1e-6)
        assert got != pytest.approx(1 - cos[i, 11], abs=1e-6)  # not torch.median's lower middle


def test_median_cos_is_exact_median_for_odd_positions():
    angles = np.arccos([[-0.5, 0.1, 0.6], [0.9, 0.2, 0.3], [0.0, 0.7, 0.8]])
    pred = np.stack([np.cos(angles), np.sin(angles)])[None]
    target = np.stack([np.ones((3, 3)), np.zeros((3, 3))])[None]
    assert LOSSES["median_cos"](_t(pred), _t(target)).item() == pytest.approx(1 - 0.3, abs=1e-12)


def test_weighted_sum_and_last_terms():
    p, t = _pair(seed=3)
    loss = build_loss(PAPER_LOSS)
    value = loss(_t(p), _t(t))
    mse, med = ((p - t) ** 2).mean(), np_median_cos(p, t)
    assert value.item() == pytest.approx(0.3 * mse + 0.7 * med, rel=1e-12)
    assert loss.last_terms == pytest.approx({"mse": mse, "median_cos": med}, rel=1e-12)

    equal = build_loss("mse + mean_cos")
    assert equal.weights == {"mse": 1.0, "mean_cos": 1.0}
    assert equal(_t(p), _t(t)).item() == pytest.approx(mse + 1 - np_cos(p, t).mean(), rel=1e-12)
    assert set(equal.last_terms) == {"mse", "mean_cos"}

    huber = build_loss({"huber": np.float32(2)}, {"huber": {"delta": np.float64(0.5)}})
    assert huber(_t(p), _t(t)).item() == pytest.approx(2 * np_huber(p, t, 0.5), rel=1e-12)


def test_loss_gradients_flow():
    pred = torch.randn(2, 4, 4, 4, requires_grad=True)
    loss = build_loss({name: 1.0 for name in LOSSES}, {"ntxent": {"num_negatives": 8}}, seed=0)
    loss(pred, torch.randn(2, 4, 4, 4)).backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    assert set(loss.last_terms) == set(LOSSES)


@pytest.mark.parametrize(("spec", "options", "match"), [
    ("mse+nope", None, r"unknown loss 'nope'; registered: .*median_cos"),
    ({"cosine": 1.0}, None, r"unknown loss 'cosine'"),
    ("mse+", None, "empty term"),
    ("mse+mse", None, "twice"),
    ({}, None, "empty"),
    ({"mse": -1.0}, None, "weight must be"),
    ({"mse": 0.0}, None, "all weights are zero"),
    (3, None, "loss spec must be"),
    ("huber", {"huber": {"beta": 1.0}}, r"unknown option\(s\) 'beta'; accepted: delta"),
    ("mse", {"huber": {"delta": 1.0}}, "not in the spec"),
    ("patch_mse", {"patch_size": 2.5}, "not in the spec"),
    ("patch_mse", {"patch_mse": {"patch_size": 2.5}}, "'patch_size' must be int"),
])
def test_build_loss_errors(spec, options, match):
    with pytest.raises(ValueError, match=match):
        build_loss(spec, options)


@pytest.mark.parametrize(("name", "options", "shape", "match"), [
    ("mse", {}, (2, 3, 4), r"same \(B, C, H, W\) shape"),
    ("patch_mse", {"patch_size": 4}, (1, 2, 3, 8), "smaller than one 4×4 patch"),
    ("huber", {"delta": 0.0}, (1, 2, 3, 3), "delta must be > 0"),
    ("trimmed_cos", {"trim_frac": 0.5}, (1, 2, 3, 3), "trim_frac"),
    ("ntxent", {"temperature": 0.0}, (1, 2, 3, 3), "temperature"),
])
def test_bad_loss_inputs(name, options, shape, match):
    x = torch.zeros(shape)
    with pytest.raises(ValueError, match=match):
        LOSSES[name](x, x, **options)


@pytest.mark.parametrize("name", ["median_cos", "mean_cos", "trimmed_cos"])
def test_mismatched_shapes_are_rejected(name):
    with pytest.raises(ValueError, match=r"\(1, 2, 3, 3\) and \(1, 2, 3, 4\)"):
        LOSSES[name](torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 4))
