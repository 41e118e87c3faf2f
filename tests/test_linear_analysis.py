"""Linear-map analysis on matrices with known spectra and hand-computed weight/bias cases."""

from __future__ import annotations

import numpy as np
import pytest

from featmap_ray.evaluation.linear_analysis import (
    WEIGHT_BIAS_METRICS,
    singular_values,
    svd_metrics,
    truncate,
    weight_bias_metrics,
    weight_bias_per_sample,
)


def orthogonal(n: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
    return q * np.sign(np.diag(r))


def with_spectrum(s, n_out: int | None = None, n_in: int | None = None) -> np.ndarray:
    """U diag(s) V^T with random orthogonal U, V: a matrix whose singular values are exactly s."""
    s = np.asarray(s, dtype=float)
    n_out, n_in = n_out or len(s), n_in or len(s)
    return orthogonal(n_out, 1)[:, : len(s)] * s @ orthogonal(n_in, 2)[:, : len(s)].T


def test_identity_is_a_full_rank_isometry():
    m = svd_metrics(np.eye(6))
    assert m["effective_rank"] == pytest.approx(6.0, abs=1e-9)
    assert m["spectral_entropy"] == pytest.approx(np.log(6), abs=1e-9)
    assert m["rank"] == 6 and m["spectral_norm"] == pytest.approx(1.0) and m["frobenius_norm"] == pytest.approx(np.sqrt(6))
    assert m["rmse_from_one"] == pytest.approx(0.0, abs=1e-9) and m["near_one_pct"] == 100.0
    assert (m["top1_energy"], m["top5_energy"], m["top10_energy"]) == pytest.approx((1 / 6, 5 / 6, 1.0))


def test_rank_one():
    m = svd_metrics(np.outer(np.arange(1.0, 5.0), np.ones(4)))
    assert m["effective_rank"] == pytest.approx(1.0, abs=1e-9) and m["top1_energy"] == pytest.approx(1.0)
    assert m["rank"] == 1


def test_chosen_spectrum_gives_the_closed_form_numbers():
    s = [2.0, 1.0, 1.0, 1.0, 0.0]  # mean 1, so s~ = s
    W = with_spectrum(s)
    np.testing.assert_allclose(singular_values(W), s, atol=1e-12)
    m = svd_metrics(W)
    # energy 4 + 1 + 1 + 1 = 7: p = (4/7, 1/7, 1/7, 1/7, 0)
    entropy = -(4 / 7 * np.log(4 / 7) + 3 / 7 * np.log(1 / 7))
    assert m["spectral_entropy"] == pytest.approx(entropy, abs=1e-9)
    assert m["effective_rank"] == pytest.approx(np.exp(entropy), abs=1e-9)  # ~3.18, not Roy-Vetterli's ~3.78
    assert m["rank"] == 4
    assert m["spectral_norm"] == pytest.approx(2.0) and m["frobenius_norm"] == pytest.approx(np.sqrt(7))
    assert m["top1_energy"] == pytest.approx(4 / 7) and m["top5_energy"] == pytest.approx(1.0)
    assert m["rmse_from_one"] == pytest.approx(np.sqrt((1 + 0 + 0 + 0 + 1) / 5))
    assert m["near_one_pct"] == pytest.approx(60.0)


def test_rank_threshold_is_absolute():
    assert svd_metrics(1e-9 * np.eye(3))["rank"] == 0
    assert svd_metrics(1e-7 * np.eye(3))["rank"] == 3


@pytest.mark.parametrize("shape", [(6, 6), (7, 5)])
def test_truncate_is_the_best_rank_k_approximation(shape):
    s = np.array([5.0, 3.0, 2.0, 1.0, 0.5])
    W = with_spectrum(s, *shape)
    rng = np.random.default_rng(3)
    for k in range(len(s) + 1):
        Wk = truncate(W, k)
        assert Wk.shape == W.shape and np.linalg.matrix_rank(Wk, tol=1e-9) == k
        error = np.linalg.norm(W - Wk)
        assert error == pytest.approx(np.sqrt(np.sum(s[k:] ** 2)), abs=1e-9)
        # any other rank-k map does worse (here: projecting W's columns onto a random k-dim subspace)
        Q = np.linalg.qr(rng.normal(size=(shape[0], max(k, 1))))[0][:, :k]
        assert error <= np.linalg.norm(W - Q @ Q.T @ W) + 1e-12
    assert truncate(W.astype(np.float32), 2).dtype == np.float32
    with pytest.raises(ValueError, match=f"k: expected 0 <= k <= {min(shape)}"):
        truncate(W, min(shape) + 1)


def test_svd_rejects_bad_matrices():
    with pytest.raises(ValueError, match=r"W: expected .*\[C_out, C_in\]"):
        svd_metrics(np.ones(4))
    with pytest.raises(ValueError, match="W: expected a finite"):
        svd_metrics(np.array([[1.0, np.nan]]))


# ---- weight vs bias ----

def reference_weight_bias(W, b, tokens, eps=1e-8) -> dict[str, float]:
    """Token by token, with W x written as an explicit sum (no bias)."""
    wx = [np.array([sum(W[o, i] * x[i] for i in range(W.shape[1])) for o in range(W.shape[0])]) for x in tokens]
    full = [v + b for v in wx]
    wx_norm = np.median([np.sqrt(v @ v) for v in wx])
    full_norm = np.median([np.sqrt(v @ v) for v in full])
    bias_norm = np.sqrt(b @ b)
    cos = np.median([v @ f / (np.sqrt(v @ v) * np.sqrt(f @ f)) for v, f in zip(wx, full, strict=True)])
    return {"wx_norm": wx_norm, "full_norm": full_norm, "bias_norm": bias_norm, "bias_effect": bias_norm,
            "wx_share": wx_norm / (full_norm + eps), "bias_share": bias_norm / (full_norm + eps),
            "bias_effect_share": bias_norm / (full_norm + eps),
            "relative_bias_shift": (full_norm - wx_norm) / (wx_norm + eps), "cosine_similarity": cos}


def test_hand_computed_case_excludes_the_bias_from_wx():
    # W = I, b = (3, 0), x = (0, 4): |Wx| = 4, |Wx + b| = 5, cos = 16 / 20
    m = weight_bias_metrics(np.eye(2), np.array([3.0, 0.0]), np.array([[0.0, 4.0]]))
    assert m == pytest.approx({"wx_norm": 4, "full_norm": 5, "bias_norm": 3, "bias_effect": 3, "wx_share": 0.8,
                               "bias_share": 0.6, "bias_effect_share": 0.6, "relative_bias_shift": 0.25,
                               "cosine_similarity": 0.8})


def test_zero_bias():
    rng = np.random.default_rng(4)
    m = weight_bias_metrics(rng.normal(size=(3, 5)), np.zeros(3), rng.normal(size=(10, 5)))
    assert m["bias_share"] == 0.0 and m["bias_effect"] == 0.0 and m["relative_bias_shift"] == pytest.approx(0, abs=1e-12)
    assert m["cosine_similarity"] == pytest.approx(1.0) and m["wx_share"] == pytest.approx(1.0)


def test_random_case_and_per_sample_rows_match_reference():
    rng = np.random.default_rng(5)
    W, b = rng.normal(size=(4, 3)), rng.normal(size=4)
    features = rng.normal(size=(3, 3, 2, 5))  # S=3 samples of C=3 x 2 x 5 (10 tokens each)
    table = weight_bias_per_sample(W, b, features)
    assert list(table.columns) == list(WEIGHT_BIAS_METRICS) and len(table) == 3
    for s in range(3):
        tokens = [features[s, :, i, j] for i in range(2) for j in range(5)]
        want = reference_weight_bias(W, b, tokens)
        assert table.iloc[s].to_dict() == pytest.approx(want, rel=1e-9), s
    assert weight_bias_metrics(W, b, features[0].reshape(3, -1).T) == pytest.approx(table.iloc[0].to_dict())


def test_weight_bias_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"b: expected shape \(4,\)"):
        weight_bias_metrics(np.ones((4, 3)), np.ones(3), np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"tokens: expected \[N, 3\]"):
        weight_bias_metrics(np.ones((4, 3)), np.ones(4), np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"features: expected \[S, C, H, W\]"):
        weight_bias_per_sample(np.ones((4, 3)), np.ones(4), np.ones((2, 3, 4)))
