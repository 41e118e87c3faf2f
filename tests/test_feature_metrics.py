"""Feature metrics against hand-computed values and an independent per-position numpy loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featmap_ray.evaluation.feature_metrics import feature_metrics, summarise


def reference_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, np.ndarray]:
    """Position by position, straight from the definitions; the median is the upper middle value
    (element ⌊n/2⌋ of the sorted cosines), the rule of the training loss."""
    out = {"cos_median_upper": [], "cos_mean": [], "cos_q05": [], "mse": []}
    for p, t in zip(pred, target, strict=True):
        cos = [float(p[:, i, j] @ t[:, i, j] / (np.linalg.norm(p[:, i, j]) * np.linalg.norm(t[:, i, j])))
               for i in range(p.shape[1]) for j in range(p.shape[2])]
        cos = sorted(cos)
        n = len(cos)
        out["cos_median_upper"].append(cos[n // 2])
        out["cos_mean"].append(sum(cos) / n)
        pos = 0.05 * (n - 1)  # linear interpolation between order statistics
        lo = int(np.floor(pos))
        out["cos_q05"].append(cos[lo] + (pos - lo) * (cos[min(lo + 1, n - 1)] - cos[lo]))
        out["mse"].append(float(((p - t) ** 2).mean()))
    return {k: np.array(v) for k, v in out.items()}


def test_hand_computed_values_with_even_number_of_positions():
    # one sample, C=2, H=1, W=4: pred is e_x everywhere, target at angle acos(c) -> cosine c
    cos = np.array([0.9, 0.1, 0.7, 0.5])
    pred = torch.zeros(1, 2, 1, 4)
    pred[0, 0] = 1.0
    target = torch.tensor(np.stack([cos, np.sqrt(1 - cos**2)])[None, :, None, :] * 3.0)  # scale must not matter
    m = feature_metrics(pred, target)
    assert m["cos_median_upper"] == pytest.approx([0.7])  # the upper of the two middle values 0.5 and 0.7
    assert m["cos_mean"] == pytest.approx([0.55])
    assert m["cos_q05"] == pytest.approx([0.1 + 0.15 * (0.5 - 0.1)])  # rank 0.05*(4-1) = 0.15
    # |pred - target|^2 per position = 1 - 2*3c + 9, averaged over C*H*W = 8 values
    assert m["mse"] == pytest.approx([np.sum(10 - 6 * cos) / 8])


@pytest.mark.parametrize("h, w", [(3, 5), (4, 6)])  # 15 positions (odd), 24 (even: the rules differ)
def test_random_batch_matches_independent_loop(h, w):
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 5, h, w, generator=gen)
    target = pred + 0.8 * torch.randn(3, 5, h, w, generator=gen)
    m = feature_metrics(pred, target)
    ref = reference_metrics(pred.numpy().astype(np.float64), target.numpy().astype(np.float64))
    for key in ref:
        assert m[key].shape == (3,) and m[key].dtype == np.float64
        np.testing.assert_allclose(m[key], ref[key], rtol=1e-6, atol=1e-9, err_msg=key)


def test_half_precision_input_and_extremes():
    pred = torch.randn(2, 4, 2, 2).half()
    m = feature_metrics(pred, pred)
    np.testing.assert_allclose(m["cos_median_upper"], 1.0, atol=1e-6)
    np.testing.assert_allclose(m["mse"], 0.0)
    m = feature_metrics(pred, -pred)
    np.testing.assert_allclose(m["cos_q05"], -1.0, atol=1e-6)


def test_summarise_is_the_mean_over_samples():
    summary = summarise({"cos_median_upper": np.array([0.2, 0.4, 0.9]), "mse": np.array([1.0, 2.0, 6.0])})
    assert summary == pytest.approx({"cos_median_upper": 0.5, "mse": 3.0, "n_samples": 3})


@pytest.mark.parametrize(
    "pred, target, match",
    [
        (torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 4), r"pred has shape \(1, 2, 3, 3\) but target"),
        (torch.zeros(2, 3, 3), torch.zeros(2, 3, 3), r"pred: expected .*\[B, C, H, W\]"),
        (torch.zeros(1, 2, 3, 3), torch.full((1, 2, 3, 3), float("nan")), "target: contains NaN"),
        (torch.full((1, 2, 3, 3), float("inf")), torch.zeros(1, 2, 3, 3), "pred: contains NaN or infinite"),
    ],
)
def test_bad_input_names_the_tensor(pred, target, match):
    with pytest.raises(ValueError, match=match):
        feature_metrics(pred, target)


def test_summarise_rejects_ragged_or_empty():
    with pytest.raises(ValueError, match="equal length"):
        summarise({"a": np.zeros(2), "b": np.zeros(3)})
    with pytest.raises(ValueError, match="empty"):
        summarise({})
