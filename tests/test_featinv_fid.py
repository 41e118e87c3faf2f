"""FID against closed forms and independent computations (no Ray)."""

import numpy as np
import pytest
import torch
import torchvision
from scipy import linalg
from scipy.stats import special_ortho_group

from featmap_ray.featinv import fid


def _gaussian_fid_closed_form(mu1, a, mu2, b) -> float:
    """Covariances with common eigenvectors and eigenvalues a, b: ||μ1−μ2||² + Σ(a + b − 2√(ab))."""
    return float(((mu1 - mu2) ** 2).sum() + (a + b - 2 * np.sqrt(a * b)).sum())


def _frechet_of_samples(x, y) -> float:
    """The FID formula on the sample means and unbiased covariances, with scipy's matrix square root."""
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    diff = x.mean(axis=0) - y.mean(axis=0)
    return float(diff @ diff + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real))


def _samples(rng, n, mean, cov):
    """n vectors whose sample mean and unbiased covariance are exactly `mean` and `cov`."""
    z = rng.normal(size=(n, len(mean)))
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # whiten: sample covariance = I
    return mean + z @ np.linalg.cholesky(cov).T


def test_fid_matches_the_closed_form_for_sets_with_known_means_and_covariances():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    rot = special_ortho_group.rvs(6, random_state=1)  # same eigenvectors, full (non-diagonal) matrices
    x = _samples(rng, 40, mu1, rot @ np.diag(a) @ rot.T)
    y = _samples(rng, 30, mu2, rot @ np.diag(b) @ rot.T)
    assert fid.fid(x, y) == pytest.approx(_gaussian_fid_closed_form(mu1, a, mu2, b), rel=1e-9)
    assert fid.fid(x, x) == pytest.approx(0, abs=1e-9)


def test_fid_matches_scipy_sqrtm_on_general_samples_and_handles_singular_covariances():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(50, 8)) @ rng.normal(size=(8, 8))
    y = rng.normal(size=(60, 8)) @ rng.normal(size=(8, 8)) + 0.5
    # Two routes to Tr (Σ1 Σ2)^½ in float64 (eigenvalues vs Schur square root): 1e-7 relative.
    assert fid.fid(x, y) == pytest.approx(_frechet_of_samples(x, y), rel=1e-7)
    few = rng.normal(size=(5, 16))  # fewer vectors than dimensions: rank-4 covariances
    assert abs(fid.fid(few, few)) < 1e-6


def test_fid_rejects_bad_feature_sets_naming_them():
    x = np.random.default_rng(3).normal(size=(10, 4))
    with pytest.raises(ValueError, match=r"reconstructions: expected \(N >= 2, D\)"):
        fid.fid(x, x[:1])
    with pytest.raises(ValueError, match="source has 4-d features, reconstructions 3-d"):
        fid.fid(x, x[:, :3])
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="source: contains NaN"):
        fid.fid(bad, x)


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
