"""Reconstruction metrics against closed forms and independent computations (no Ray)."""

import numpy as np
import pytest
import torch
import torchvision
from scipy.stats import special_ortho_group

from featmap_ray.featinv import metrics


def _gaussian_fid_closed_form(mu1, a, mu2, b) -> float:
    """Covariances with common eigenvectors and eigenvalues a, b: ||μ1−μ2||² + Σ(a + b − 2√(ab))."""
    return float(((mu1 - mu2) ** 2).sum() + (a + b - 2 * np.sqrt(a * b)).sum())


def test_frechet_distance_matches_the_closed_form_for_diagonal_and_rotated_covariances():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = _gaussian_fid_closed_form(mu1, a, mu2, b)
    assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    rot = special_ortho_group.rvs(6, random_state=1)  # same eigenvectors, full (non-diagonal) matrices
    assert metrics.frechet_distance(mu1, rot @ np.diag(a) @ rot.T, mu2, rot @ np.diag(b) @ rot.T) == pytest.approx(
        expected, rel=1e-7)
    assert metrics.frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0, abs=1e-9)


def test_frechet_distance_guards_singular_covariances_and_rejects_bad_shapes():
    features = np.random.default_rng(2).normal(size=(5, 16))  # fewer samples than dimensions: rank 4
    mu, sigma = metrics.activation_statistics(features)
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-3
    with pytest.raises(ValueError, match="shapes do not match"):
        metrics.frechet_distance(mu, sigma, mu[:3], sigma[:3, :3])


def test_activation_statistics_are_the_sample_mean_and_unbiased_covariance():
    mixing = np.array([[2, 0, 0, 0], [1, 1, 0, 0], [0, 0, 3, 0], [0, 0, 0, 1.0]])
    x = np.random.default_rng(3).normal(size=(50, 4)) @ mixing
    mu, sigma = metrics.activation_statistics(x)
    centred = x - x.sum(axis=0) / len(x)
    np.testing.assert_allclose(mu, x.sum(axis=0) / len(x))
    np.testing.assert_allclose(sigma, centred.T @ centred / (len(x) - 1))
    with pytest.raises(ValueError, match=r"expected \(N >= 2, D\)"):
        metrics.activation_statistics(x[:1])


def test_fid_of_samples_from_two_gaussians_approaches_the_closed_form():
    rng = np.random.default_rng(4)
    mu1, mu2, a, b = np.zeros(3), np.array([1.0, -1, 0.5]), np.array([1.0, 2, 0.5]), np.array([2.0, 0.5, 1])
    x = mu1 + rng.normal(size=(20000, 3)) * np.sqrt(a)
    y = mu2 + rng.normal(size=(20000, 3)) * np.sqrt(b)
    assert metrics.fid(x, y) == pytest.approx(_gaussian_fid_closed_form(mu1, a, mu2, b), abs=0.05)


def test_median_cosine_is_the_lower_median_of_per_position_cosines():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(3, 8, 2, 2)), rng.normal(size=(3, 8, 2, 2))
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))  # (3, 2, 2)
    expected = np.sort(cos.reshape(3, 4), axis=1)[:, 1]  # 4 positions: the lower of the two middle values
    got = metrics.median_cosine(torch.from_numpy(a), torch.from_numpy(b))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.median_cosine(torch.zeros(1, 8, 2, 2), torch.zeros(1, 8, 3, 3))


def test_classifier_agreement_top1_and_top5():
    source = torch.tensor([[0.0, 9, 0, 0, 0, 0, 0], [5, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 7]])
    recon = torch.tensor([[0.0, 9, 0, 0, 0, 0, 0], [5.5, 9, 8, 7, 6, 5, 0], [9, 8, 7, 6, 5, 4, 3]])
    top1, match1, match5 = metrics.classifier_agreement(source, recon)
    assert top1.tolist() == [1, 0, 6]
    assert match1.tolist() == [True, False, False]
    assert match5.tolist() == [True, True, False]


def test_inception_extractor_loads_a_local_state_dict_and_gives_pool_features(tmp_path):
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    reference = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=True).eval()
    torch.save(reference.state_dict(), tmp_path / "inception.pth")
    extractor = metrics.inception_extractor(tmp_path / "inception.pth")
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
        metrics.inception_extractor(tmp_path / "missing.pth")
