"""FID against closed forms and independent computations (no Ray)."""

import numpy as np
import pytest
import torch
import torchvision
from scipy.stats import special_ortho_group

from featmap_ray.featinv import fid


def _gaussian_fid_closed_form(mu1, a, mu2, b) -> float:
    """Covariances with common eigenvectors and eigenvalues a, b: ||μ1−μ2||² + Σ(a + b − 2√(ab))."""
    return float(((mu1 - mu2) ** 2).sum() + (a + b - 2 * np.sqrt(a * b)).sum())


def test_frechet_distance_matches_the_closed_form_for_diagonal_and_rotated_covariances():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = _gaussian_fid_closed_form(mu1, a, mu2, b)
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    rot = special_ortho_group.rvs(6, random_state=1)  # same eigenvectors, full (non-diagonal) matrices
    assert fid.frechet_distance(mu1, rot @ np.diag(a) @ rot.T, mu2, rot @ np.diag(b) @ rot.T) == pytest.approx(
        expected, rel=1e-7)
    assert fid.frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0, abs=1e-9)


def test_frechet_distance_guards_singular_covariances_and_rejects_bad_shapes():
    features = np.random.default_rng(2).normal(size=(5, 16))  # fewer samples than dimensions: rank 4
    mu, sigma = fid.activation_statistics(features)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-3
    with pytest.raises(ValueError, match="shapes do not match"):
        fid.frechet_distance(mu, sigma, mu[:3], sigma[:3, :3])


def test_activation_statistics_are_the_sample_mean_and_unbiased_covariance():
    mixing = np.array([[2, 0, 0, 0], [1, 1, 0, 0], [0, 0, 3, 0], [0, 0, 0, 1.0]])
    x = np.random.default_rng(3).normal(size=(50, 4)) @ mixing
    mu, sigma = fid.activation_statistics(x)
    centred = x - x.sum(axis=0) / len(x)
    np.testing.assert_allclose(mu, x.sum(axis=0) / len(x))
    np.testing.assert_allclose(sigma, centred.T @ centred / (len(x) - 1))
    with pytest.raises(ValueError, match=r"expected \(N >= 2, D\)"):
        fid.activation_statistics(x[:1])


def test_fid_of_samples_from_two_gaussians_approaches_the_closed_form():
    rng = np.random.default_rng(4)
    mu1, mu2, a, b = np.zeros(3), np.array([1.0, -1, 0.5]), np.array([1.0, 2, 0.5]), np.array([2.0, 0.5, 1])
    x = mu1 + rng.normal(size=(20000, 3)) * np.sqrt(a)
    y = mu2 + rng.normal(size=(20000, 3)) * np.sqrt(b)
    assert fid.fid(x, y) == pytest.approx(_gaussian_fid_closed_form(mu1, a, mu2, b), abs=0.05)


def test_inception_extractor_loads_a_local_state_dict_and_gives_pool_features(tmp_path):
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    reference = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=True).eval()
    torch.save(reference.state_dict(), tmp_path / "inception.pth")
    extractor = fid.inception_extractor(tmp_path / "inception.pth")
    assert extractor.name == "fid_inception"
    pixels = torch.from_numpy(np.random.default_rng(6).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8))
    got = extractor(pixels)
    # Independent: torchvision's own input path (ImageNet normalisation + transform_input) and its avgpool.
    x = torch.nn.functional.interpolate(pixels.permute(0, 3, 1, 2).float() / 255, size=(299, 299), mode="bilinear",
                                        align_corners=False, antialias=True)
    x = torchvision.transforms.functional.normalize(x, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    reference.fc = torch.nn.Identity()
    with torch.no_grad():
        expected = reference(x).numpy()
    assert got.shape == (2, 2048)
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)
    with pytest.raises(FileNotFoundError, match="fid_inception_weights"):
        fid.inception_extractor(tmp_path / "missing.pth")
