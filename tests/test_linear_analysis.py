"""Linear-map analysis on matrices with known spectra and hand-computed weight/bias cases."""

from __future__ import annotations

import numpy as np
import pytest

from featmap_ray.evaluation.linear_analysis import (
    WEIGHT_BIAS_METRICS,
    singular_values,
    svd_metrics,
    truncate,
    truncated_affine,
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


def test_rank_threshold_is_relative_to_the_largest_singular_value():
    assert svd_metrics(1e-9 * np.eye(3))["rank"] == 3  # scale does not matter
    assert svd_metrics(1e9 * np.eye(3))["rank"] == 3
    # s_1 · max(m, n) · eps: 1 · 3 · 2.2e-16 for float64, 1 · 3 · 1.2e-7 for float32
    W = with_spectrum([1.0, 1e-4, 1e-10])
    assert svd_metrics(W)["rank"] == 3
    assert svd_metrics(W, weights_dtype=np.float32)["rank"] == 2
    # 2 × 2: the float32 tolerance is 2 · 1.19e-7 = 2.4e-7
    assert svd_metrics(with_spectrum([1.0, 2e-7]), weights_dtype=np.float32)["rank"] == 1
    assert svd_metrics(with_spectrum([1.0, 3e-7]), weights_dtype=np.float32)["rank"] == 2


def planted_rank8() -> np.ndarray:
    """A 128×128 map of rank 8 with singular values 8, 7, ..., 1 (float64)."""
    return orthogonal(128, 1)[:, :8] * np.arange(8.0, 0.0, -1.0) @ orthogonal(128, 2)[:, :8].T


def test_planted_rank8_map_stored_in_float32_has_rank_8():
    w32 = planted_rank8().astype(np.float32)
    noise = singular_values(w32)[8]
    assert 1e-8 < noise < 1e-5  # float32 rounding: an absolute 1e-8 cut-off would count it
    assert svd_metrics(w32)["rank"] == 8  # the dtype of the given weights
    # analysed in float64 (as raw_affine does), with the dtype the weights were stored in
    assert svd_metrics(w32.astype(np.float64), weights_dtype=np.float32)["rank"] == 8
    assert svd_metrics(w32.astype(np.float64))["rank"] > 8  # without it, the noise counts


def test_planted_rank8_map_in_float64_has_rank_8():
    assert svd_metrics(planted_rank8())["rank"] == 8
    assert svd_metrics(planted_rank8(), weights_dtype=np.float64)["rank"] == 8


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


def least_squares_fit(n_out: int, n_in: int, seed: int):
    """(W, b, x_mean, y_mean, X, Y): an ordinary least-squares fit with intercept of noisy affine
    data whose inputs are not centred."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(400, n_in)) * rng.uniform(0.5, 2.0, n_in) + rng.normal(size=n_in) * 3
    Y = X @ rng.normal(size=(n_out, n_in)).T + rng.normal(size=n_out) * 5 + 0.3 * rng.normal(size=(400, n_out))
    coef, *_ = np.linalg.lstsq(np.hstack([X, np.ones((len(X), 1))]), Y, rcond=None)
    return coef[:-1].T, coef[-1], X.mean(axis=0), Y.mean(axis=0), X, Y


@pytest.mark.parametrize("shape", [(6, 6), (4, 7)])
def test_truncated_affine_at_rank_zero_predicts_the_mean_target(shape):
    W, b, x_mean, y_mean, X, _ = least_squares_fit(*shape, seed=6)
    Wk, bk = truncated_affine(W, 0, x_mean, y_mean)
    assert Wk.shape == W.shape and bk.shape == (shape[0],)
    inputs = np.vstack([X[:5], 100 * np.random.default_rng(7).normal(size=(5, shape[1]))])
    for x in inputs:
        np.testing.assert_allclose(Wk @ x + bk, y_mean, rtol=1e-15, atol=0)
    assert not np.allclose(b, y_mean)  # keeping the full map's bias would predict b instead


@pytest.mark.parametrize("shape", [(6, 6), (4, 7)])
def test_truncated_affine_at_full_rank_gives_back_a_least_squares_fit(shape):
    W, b, x_mean, y_mean, X, Y = least_squares_fit(*shape, seed=8)
    np.testing.assert_allclose(b, y_mean - W @ x_mean, atol=1e-9)  # the premise: an LS fit
    Wk, bk = truncated_affine(W, min(shape), x_mean, y_mean)
    np.testing.assert_allclose(Wk, W, atol=1e-12)
    np.testing.assert_allclose(bk, b, atol=1e-9)
    for k in range(1, min(shape)):
        # for every k the intercept is the best one for W_k: the training residuals have mean zero
        Wk, bk = truncated_affine(W, k, x_mean, y_mean)
        np.testing.assert_allclose((Y - X @ Wk.T - bk).mean(axis=0), 0, atol=1e-9)
        np.testing.assert_allclose(Wk, truncate(W, k), atol=0)


def test_truncated_affine_rejects_means_of_the_wrong_length():
    with pytest.raises(ValueError, match=r"x_mean, y_mean: expected shapes \(3,\) and \(4,\)"):
        truncated_affine(np.ones((4, 3)), 1, np.zeros(4), np.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        truncated_affine(np.ones((4, 3)), 1, np.zeros(3), np.full(4, np.nan))


def test_runs_without_training_means_must_be_refitted():
    from featmap_ray.stages.analyze import train_means

    with pytest.raises(ValueError, match=r"mapping run t--affine--x .*no train_means.*re-fit it"):
        train_means({"spec": {}}, "t--affine--x (/runs/x)")
    x, y = train_means({"train_means": {"x": [1, 2], "y": [3.5, 4, 5]}}, "r")
    assert x.tolist() == [1.0, 2.0] and y.tolist() == [3.5, 4.0, 5.0] and x.dtype == np.float64


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
