"""Analysis of a learned linear map y = W x + b (spec §9): how much of the output comes from
W x versus the bias, and the singular-value spectrum of W (rank, isometry), plus truncation.

Inputs are numpy arrays (CPU tensors work too); everything is computed in float64.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

WEIGHT_BIAS_METRICS = ("wx_norm", "full_norm", "bias_norm", "bias_effect", "wx_share", "bias_share",
                       "bias_effect_share", "relative_bias_shift", "cosine_similarity")


def _matrix(W) -> np.ndarray:
    W = np.asarray(W, dtype=np.float64)
    if W.ndim != 2 or 0 in W.shape or not np.isfinite(W).all():
        raise ValueError(f"W: expected a finite, non-empty matrix [C_out, C_in], got shape {W.shape}")
    return W


def weight_bias_metrics(W, b, tokens, eps: float = 1e-8) -> dict[str, float]:
    """Weight-vs-bias dominance over tokens x_t [N, C_in] (e.g. one sample's H·W superpixels),
    with W x_t computed without the bias (the reference adds it twice):

    wx_norm = median_t |W x_t|; full_norm = median_t |W x_t + b|; bias_norm = |b|;
    bias_effect = median_t |(W x_t + b) - W x_t| (= |b| up to rounding);
    wx_share = wx_norm / (full_norm + eps); bias_share = bias_norm / (full_norm + eps);
    bias_effect_share = bias_effect / (full_norm + eps);
    relative_bias_shift = (full_norm - wx_norm) / (wx_norm + eps);
    cosine_similarity = median_t cos(W x_t, W x_t + b), each norm clamped to eps.
    """
    W = _matrix(W)
    b = np.asarray(b, dtype=np.float64)
    tokens = np.asarray(tokens, dtype=np.float64)
    if b.shape != (W.shape[0],):
        raise ValueError(f"b: expected shape ({W.shape[0]},) to match W {W.shape}, got {b.shape}")
    if tokens.ndim != 2 or tokens.shape[1] != W.shape[1] or tokens.shape[0] == 0:
        raise ValueError(f"tokens: expected [N, {W.shape[1]}] with N > 0 to match W {W.shape}, got {tokens.shape}")
    wx = tokens @ W.T
    full = wx + b
    wx_norms, full_norms = np.linalg.norm(wx, axis=1), np.linalg.norm(full, axis=1)
    cosines = (wx * full).sum(1) / (np.maximum(wx_norms, eps) * np.maximum(full_norms, eps))
    wx_norm, full_norm = float(np.median(wx_norms)), float(np.median(full_norms))
    bias_norm = float(np.linalg.norm(b))
    bias_effect = float(np.median(np.linalg.norm(full - wx, axis=1)))
    return {
        "wx_norm": wx_norm,
        "full_norm": full_norm,
        "bias_norm": bias_norm,
        "bias_effect": bias_effect,
        "wx_share": wx_norm / (full_norm + eps),
        "bias_share": bias_norm / (full_norm + eps),
        "bias_effect_share": bias_effect / (full_norm + eps),
        "relative_bias_shift": (full_norm - wx_norm) / (wx_norm + eps),
        "cosine_similarity": float(np.median(cosines)),
    }


def weight_bias_per_sample(W, b, features, eps: float = 1e-8) -> pd.DataFrame:
    """`weight_bias_metrics` per sample of features [S, C_in, H, W] (its H·W superpixels are the
    tokens, as the reference): one row per sample (index = sample position), one column per metric."""
    features = np.asarray(features)
    if features.ndim != 4:
        raise ValueError(f"features: expected [S, C, H, W], got shape {features.shape}")
    tokens = features.reshape(features.shape[0], features.shape[1], -1).transpose(0, 2, 1)
    return pd.DataFrame([weight_bias_metrics(W, b, t, eps) for t in tokens], columns=list(WEIGHT_BIAS_METRICS))


def singular_values(W) -> np.ndarray:
    """Singular values of W in descending order (float64)."""
    return np.linalg.svd(_matrix(W), compute_uv=False)


def rank_tolerance(s: np.ndarray, shape: tuple[int, int], weights_dtype) -> float:
    """s_1 · max(m, n) · eps(weights_dtype): singular values at or below it are rounding noise of
    weights stored in that dtype (numpy.linalg.matrix_rank's default tolerance)."""
    return float(s[0] * max(shape) * np.finfo(weights_dtype).eps) if len(s) else 0.0


def svd_metrics(W, eps: float = 1e-12, weights_dtype=None) -> dict[str, float]:
    """Spectrum metrics of W with singular values s_1 >= ... >= s_n, E = sum s_i^2 + eps and the
    energy distribution p_i = s_i^2 / E:

    - effective_rank = exp(spectral_entropy), spectral_entropy = -sum p_i ln(p_i + eps). This is
      the reference's definition, on the energy s^2/sum s^2; Roy & Vetterli (2007) use s/sum s,
      which gives larger values for any non-flat spectrum. Both equal n for a flat spectrum.
    - rank = #{s_i > s_1 · max(m, n) · eps(weights_dtype)} (`rank_tolerance`, numpy's matrix_rank
      rule), relative to s_1 and to the precision the weights were stored in: `weights_dtype`,
      default W's own floating dtype (float64 for anything else). Pass it when W was converted,
      e.g. float32 weights analysed in float64, or their rounding noise counts as rank. The
      reference's absolute #{s_i > 1e-8} counts it: a planted rank-8 map of 128 channels fitted
      and stored in float32 (σ_9 ≈ 3.5e-8) has rank 56–61 by that rule;
    - spectral_norm = s_1; frobenius_norm = sqrt(sum s_i^2);
    - top{1,5,10}_energy = (s_1^2 + ... + s_k^2) / E;
    - with s~ = s / (mean(s) + eps): rmse_from_one = sqrt(mean((s~ - 1)^2)) and
      near_one_pct = 100 * fraction of |s~ - 1| < 0.1, i.e. closeness to a scaled isometry.
    """
    if weights_dtype is None:
        dtype = np.asarray(W).dtype
        weights_dtype = dtype if np.issubdtype(dtype, np.floating) else np.float64
    W = _matrix(W)
    s = singular_values(W)
    energy = np.sum(s**2) + eps
    p = s**2 / energy
    entropy = float(-np.sum(p * np.log(p + eps)))
    scaled = s / (s.mean() + eps)
    return {
        "effective_rank": float(np.exp(entropy)),
        "spectral_entropy": entropy,
        "rank": int(np.sum(s > rank_tolerance(s, W.shape, weights_dtype))),
        "spectral_norm": float(s[0]),
        "frobenius_norm": float(np.sqrt(np.sum(s**2))),
        **{f"top{k}_energy": float(np.sum(s[:k] ** 2) / energy) for k in (1, 5, 10)},
        "rmse_from_one": float(np.sqrt(np.mean((scaled - 1) ** 2))),
        "near_one_pct": float(100 * np.mean(np.abs(scaled - 1) < 0.1)),
    }


def truncate(W, k: int) -> np.ndarray:
    """Best rank-k approximation of W in Frobenius and spectral norm (Eckart–Young), same dtype."""
    dtype = np.asarray(W).dtype
    W = _matrix(W)
    if not 0 <= k <= min(W.shape):
        raise ValueError(f"k: expected 0 <= k <= {min(W.shape)} for W of shape {W.shape}, got {k}")
    U, s, Vh = np.linalg.svd(W, full_matrices=False)
    return ((U[:, :k] * s[:k]) @ Vh[:k]).astype(dtype if np.issubdtype(dtype, np.floating) else np.float64)


def truncated_affine(W, k: int, x_mean, y_mean) -> tuple[np.ndarray, np.ndarray]:
    """(W_k, b_k): the rank-k truncation of y = W x + b with its own intercept.

    W_k = `truncate(W, k)` and b_k = ȳ − W_k x̄, where x̄ and ȳ are the per-channel means of the
    training inputs and targets (over pairs and positions, in the space W acts in). b_k is the
    least-squares intercept for the fixed W_k, so k = 0 predicts the mean target ȳ for every
    input, and for a least-squares fit (b = ȳ − W x̄) full rank gives back (W, b). Keeping the
    full map's b instead would make the k = 0 map predict b, not ȳ. float64.
    """
    W = _matrix(W)
    x_mean = np.asarray(x_mean, dtype=np.float64)
    y_mean = np.asarray(y_mean, dtype=np.float64)
    if x_mean.shape != (W.shape[1],) or y_mean.shape != (W.shape[0],):
        raise ValueError(f"x_mean, y_mean: expected shapes ({W.shape[1]},) and ({W.shape[0]},) to match W {W.shape}, "
                         f"got {x_mean.shape} and {y_mean.shape}")
    if not (np.isfinite(x_mean).all() and np.isfinite(y_mean).all()):
        raise ValueError("x_mean, y_mean: contain NaN or infinite values")
    Wk = truncate(W, k)
    return Wk, y_mean - Wk @ x_mean
