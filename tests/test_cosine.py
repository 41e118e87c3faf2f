"""The one per-position cosine and its median rules, against hand-computed values and numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featmap_ray.cosine import RULES, median_cosine, median_of_positions, position_cosine

# Two images of 2×3 = 6 positions (even H·W), with these per-position cosines (row-major).
COSINES = np.array([[0.9, -0.2, 0.5, 0.1, 0.7, 0.3],  # sorted: -0.2 0.1 0.3 | 0.5 0.7 0.9
                    [0.0, 0.8, -0.6, 0.4, 0.2, 0.6]])  # sorted: -0.6 0.0 0.2 | 0.4 0.6 0.8
BY_HAND = {"lower": [0.3, 0.2], "upper": [0.5, 0.4], "mean": [0.4, 0.3]}


def planted(cosines: np.ndarray, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pred, target) of shape (B, 2, h, w): target e_x everywhere, pred the unit vector at angle
    arccos(c) scaled by 3 (the cosine must not depend on the norm)."""
    angles = np.arccos(cosines).reshape(len(cosines), h, w)
    pred = 3.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    target = np.stack([np.ones_like(angles), np.zeros_like(angles)], axis=1)
    return torch.from_numpy(pred), torch.from_numpy(target)


def np_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(B, C, H, W) × 2 -> (B, H·W), straight from the definition (eps 1e-8 norms, clamp)."""
    a, b = a.reshape(*a.shape[:2], -1), b.reshape(*b.shape[:2], -1)
    na = np.maximum(np.linalg.norm(a, axis=1), 1e-8)
    nb = np.maximum(np.linalg.norm(b, axis=1), 1e-8)
    return np.clip((a * b).sum(1) / (na * nb), -1 + 1e-8, 1 - 1e-8)


def test_rules_are_the_three_the_papers_use():
    assert set(RULES) == {"upper", "lower", "mean"}


@pytest.mark.parametrize("rule", RULES)
def test_each_rule_gives_the_hand_computed_median_for_even_positions(rule):
    pred, target = planted(COSINES, 2, 3)
    np.testing.assert_allclose(position_cosine(pred, target).numpy(), COSINES, atol=1e-12)
    np.testing.assert_allclose(median_cosine(pred, target, rule).numpy(), BY_HAND[rule], atol=1e-12)
    np.testing.assert_allclose(median_of_positions(torch.from_numpy(COSINES), rule).numpy(), BY_HAND[rule],
                               atol=1e-15)


def test_lower_is_torch_median_and_mean_is_numpy_median():
    # the rules' names for what the sources call the median
    cos = torch.from_numpy(np.random.default_rng(0).normal(size=(4, 24)))
    assert torch.equal(median_of_positions(cos, "lower"), cos.median(dim=1).values)
    np.testing.assert_allclose(median_of_positions(cos, "mean").numpy(), np.median(cos.numpy(), axis=1), rtol=1e-15)
    upper = np.sort(cos.numpy(), axis=1)[:, 12]  # element ⌊24/2⌋ of the ascending cosines
    assert median_of_positions(cos, "upper").numpy().tolist() == upper.tolist()  # a selected element, no arithmetic


@pytest.mark.parametrize("rule", RULES)
def test_rules_agree_for_odd_positions(rule):
    cosines = np.array([[-0.5, 0.1, 0.6, 0.9, 0.2, 0.3, 0.0, 0.7, 0.8]])  # 3×3, sorted middle: 0.3
    pred, target = planted(cosines, 3, 3)
    assert median_cosine(pred, target, rule).item() == pytest.approx(0.3, abs=1e-12)


def test_position_cosine_matches_numpy_and_handles_zero_and_equal_vectors():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(3, 5, 4, 6)), rng.normal(size=(3, 5, 4, 6))
    got = position_cosine(torch.from_numpy(a), torch.from_numpy(b))
    assert got.shape == (3, 24)
    np.testing.assert_allclose(got.numpy(), np_cos(a, b), atol=1e-12)
    a[0, :, 0, 0] = 0.0  # a zero vector has cosine 0
    assert position_cosine(torch.from_numpy(a), torch.from_numpy(b))[0, 0].item() == 0.0
    same = torch.from_numpy(b)
    np.testing.assert_allclose(position_cosine(same, same).numpy(), 1 - 1e-8, atol=1e-15)  # clamped below 1
    np.testing.assert_allclose(position_cosine(same, -same).numpy(), -1 + 1e-8, atol=1e-15)


def test_bad_rule_and_shapes_are_rejected():
    x = torch.zeros(1, 2, 3, 3)
    with pytest.raises(ValueError, match=r"median rule must be one of \('upper', 'lower', 'mean'\), got 'middle'"):
        median_cosine(x, x, "middle")
    with pytest.raises(ValueError, match=r"\(1, 2, 3, 3\) and \(1, 2, 3, 4\)"):
        position_cosine(x, torch.zeros(1, 2, 3, 4))
    with pytest.raises(ValueError, match=r"\(2, 3, 3\)"):
        position_cosine(x[0], x[0])
