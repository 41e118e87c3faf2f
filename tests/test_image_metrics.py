"""Image-space metrics, change mask and noise control against independent computations (no Ray)."""

import math

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from featmap_ray.config import BackboneRequest
from featmap_ray.evaluation import image_metrics as im
from featmap_ray.featinv.metrics import BackboneProbe
from tests.conftest import tiny_backbone


def _images(seed: int, shape=(20, 24, 3)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, shape, dtype=np.uint8), rng.integers(0, 256, shape, dtype=np.uint8)


def _ssim_wang(a: np.ndarray, b: np.ndarray, win: int = 7, data_range: float = 255) -> float:
    """Wang et al.'s SSIM with a win×win uniform window over every window inside the image, sample
    (co)variances, K1 = 0.01, K2 = 0.03; mean over positions and channels."""
    x, y = (sliding_window_view(img.astype(np.float64), (win, win), axis=(0, 1)) for img in (a, b))
    mx, my = x.mean(axis=(-2, -1)), y.mean(axis=(-2, -1))
    n = win * win
    vx, vy = x.var(axis=(-2, -1), ddof=1), y.var(axis=(-2, -1), ddof=1)
    cov = ((x - mx[..., None, None]) * (y - my[..., None, None])).sum(axis=(-2, -1)) / (n - 1)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return float((((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean())


def test_mse_and_psnr_of_images_differing_by_a_constant():
    a = np.random.default_rng(0).integers(0, 200, (16, 16, 3), dtype=np.uint8)
    b = a + np.uint8(7)
    assert im.mse_255(a, b) == 49.0
    assert im.psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 49), rel=1e-12)
    assert im.mse_255(a, a) == 0.0 and im.psnr(a, a) == math.inf
    x, y = _images(1)
    expected = ((x.astype(np.float64) - y) ** 2).mean()  # not a − b in uint8, which wraps around
    assert im.mse_255(x, y) == pytest.approx(expected, rel=1e-12)
    assert im.psnr(x, y) == pytest.approx(10 * math.log10(255**2 / expected), rel=1e-12)


def test_ssim_is_one_for_identical_images_and_wangs_formula_otherwise():
    a, b = _images(2)
    assert im.ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    # Correlated images, so SSIM is far from 0; float64 sums in another order: 1e-9.
    c = np.clip(a.astype(int) // 2 + b // 4 + 30, 0, 255).astype(np.uint8)
    assert im.ssim(a, c) == pytest.approx(_ssim_wang(a, c), abs=1e-9)
    assert im.ssim(a, b) == pytest.approx(_ssim_wang(a, b), abs=1e-9)


@pytest.mark.parametrize("call", [im.mse_255, im.ssim, im.psnr])
def test_pixel_metrics_reject_bad_images_naming_them(call):
    a, b = _images(3)
    with pytest.raises(ValueError, match=r"b: shape \(10, 24, 3\) differs"):
        call(a, b[:10])
    with pytest.raises(ValueError, match="b: expected a uint8 image, got dtype float64"):
        call(a, b.astype(np.float64))
    with pytest.raises(ValueError, match=r"a: expected an RGB image of shape \(H, W, 3\)"):
        call(a[..., 0], b[..., 0])


def test_resize_to_takes_pils_width_height_and_is_bicubic():
    a, _ = _images(4, (10, 20, 3))
    assert im.resize_to(a, (20, 10)) is a
    assert im.resize_to(a, (40, 30)).shape == (30, 40, 3)
    assert (im.resize_to(np.full((5, 7, 3), 77, np.uint8), (3, 11)) == 77).all()
    # A cubic kernel overshoots at a step edge (bilinear never leaves [0, 200]).
    step = np.zeros((8, 8, 3), np.uint8)
    step[:, 4:] = 200
    assert im.resize_to(step, (32, 32)).max() > 200


def _square(shape, rows, cols, value=240, background=40) -> tuple[np.ndarray, np.ndarray]:
    original = np.full(shape, background, np.uint8)
    manipulated = original.copy()
    manipulated[rows[0]:rows[1], cols[0]:cols[1]] = value
    return original, manipulated


def test_change_mask_marks_the_cells_of_a_changed_square():
    # The 5×5 blur (σ 1.1: weights .071 .245 .370 .245 .071) spreads a 200-step by one pixel above the
    # threshold (.315·200·√3 = 109 > 50; two pixels out .071·200·√3 = 24): a square at >= 2 px from the
    # cell borders marks exactly the cells it covers.
    original, manipulated = _square((90, 90, 3), (32, 58), (62, 78))
    expected = np.zeros((9, 9), bool)
    expected[32 // 10:(58 - 1) // 10 + 1, 62 // 10:(78 - 1) // 10 + 1] = True  # cells of 10×10 px
    assert expected.sum() == 6
    np.testing.assert_array_equal(im.change_mask(original, manipulated, (9, 9)), expected)
    # A non-square grid: cells of 90//3 × 90//6 = 30×15 px.
    np.testing.assert_array_equal(np.argwhere(im.change_mask(original, manipulated, (3, 6))),
                                  [[1, 4], [1, 5]])
    # The manipulated image at twice the size: bilinear halving of a pixel-doubled image restores it.
    big = np.repeat(np.repeat(manipulated, 2, axis=0), 2, axis=1)
    np.testing.assert_array_equal(im.change_mask(original, big, (9, 9)), expected)


def test_change_mask_thresholds_the_rgb_norm_and_ignores_the_remainder():
    original = np.full((12, 12, 3), 100, np.uint8)
    # A uniform change of d per channel has L2 norm d·√3 over RGB: 30 -> 52 > 50, 28 -> 48.5.
    assert im.change_mask(original, original + np.uint8(30), (4, 4)).all()
    assert not im.change_mask(original, original + np.uint8(28), (4, 4)).any()
    # 95 px on a 9-cell grid: cells of 10 px, rows and columns 90-94 belong to no cell.
    original, manipulated = _square((95, 95, 3), (91, 95), (91, 95))
    assert not im.change_mask(original, manipulated, (9, 9)).any()
    with pytest.raises(ValueError, match="grid"):
        im.change_mask(original, manipulated, (96, 9))
    with pytest.raises(ValueError, match="manipulated: expected a uint8 image"):
        im.change_mask(original, manipulated.astype(np.float32), (9, 9))


def _planted_maps(cosines: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(2, H, W) maps whose per-position cosine is `cosines` (H, W), with different vector lengths."""
    angle = np.arccos(cosines)
    a = np.stack([np.full_like(cosines, 2.0), np.zeros_like(cosines)])
    b = np.stack([np.cos(angle), np.sin(angle)]) * 3.0
    return a.astype(np.float32), b.astype(np.float32)


def test_masked_median_cosine_is_the_lower_median_over_the_mask():
    cosines = np.array([[0.9, -0.2, 0.1], [0.3, 0.7, 0.5], [0.0, 0.8, -0.5]])
    a, b = _planted_maps(cosines)
    mask = np.array([[1, 0, 1], [0, 1, 1], [0, 0, 0]], bool)  # cosines 0.9, 0.1, 0.7, 0.5
    assert im.masked_median_cosine(a, b, mask) == pytest.approx(0.5, abs=1e-6)  # lower of 0.5, 0.7
    mask[2, 1] = True  # + 0.8: odd count, middle value 0.7
    assert im.masked_median_cosine(torch.from_numpy(a), b, mask) == pytest.approx(0.7, abs=1e-6)
    assert im.masked_median_cosine(a, b, np.zeros((3, 3), bool)) == 0.0
    with pytest.raises(ValueError, match=r"mask: expected a bool array of the feature grid's shape \(3, 3\)"):
        im.masked_median_cosine(a, b, mask[:2])
    bad = b.copy()
    bad[0, 1, 1] = np.nan
    with pytest.raises(ValueError, match="feat_b: contains NaN"):
        im.masked_median_cosine(a, bad, mask)
    with pytest.raises(ValueError, match="feat_b: shape"):
        im.masked_median_cosine(a, b[:, :2], mask)


def test_noise_control_matches_the_mappings_change_at_every_position():
    rng = np.random.default_rng(5)
    original = rng.normal(size=(6, 4, 5)).astype(np.float32)
    mapped = original + rng.normal(size=original.shape).astype(np.float32) * rng.uniform(0, 3, (1, 4, 5))
    mapped[:, 1, 2] = original[:, 1, 2]  # a position the mapping leaves unchanged
    change = np.linalg.norm(mapped.astype(np.float64) - original, axis=0)
    noisy = im.noise_control(original, mapped, np.random.default_rng(0))
    assert noisy.dtype == np.float32 and noisy.shape == original.shape
    # float32 rounding of original + noise: at most 2^-24 of |value| per entry.
    tol = 2**-24 * np.abs(noisy).max() * np.sqrt(6) * 2
    np.testing.assert_allclose(np.linalg.norm(noisy.astype(np.float64) - original, axis=0), change, rtol=0, atol=tol)
    np.testing.assert_array_equal(noisy[:, 1, 2], original[:, 1, 2])
    other = im.noise_control(original, mapped, np.random.default_rng(1))
    np.testing.assert_allclose(np.linalg.norm(other.astype(np.float64) - original, axis=0), change, rtol=0, atol=tol)
    assert np.abs(other - noisy).max() > 0.1  # another seed: other directions, same norms
    np.testing.assert_array_equal(im.noise_control(original, mapped, np.random.default_rng(0)), noisy)


def test_noise_control_rejects_bad_input_naming_it():
    original = np.zeros((3, 2, 2), np.float32)
    with pytest.raises(ValueError, match="mapped: shape"):
        im.noise_control(original, np.zeros((3, 2, 3), np.float32), np.random.default_rng(0))
    with pytest.raises(ValueError, match="original: contains NaN"):
        im.noise_control(np.full((3, 2, 2), np.nan), original, np.random.default_rng(0))
    with pytest.raises(TypeError, match="rng: expected a numpy Generator"):
        im.noise_control(original, original, 0)


@pytest.fixture(scope="module")
def judge():
    return BackboneProbe(BackboneRequest(**tiny_backbone("convnext_base")), "stage3")


def test_compare_gives_the_row_with_the_judges_lower_median_cosines(judge, single_torch_thread):
    a, b = _images(6, (288, 288, 3))
    mask = np.zeros((9, 9), bool)
    mask[2:4, 5:9] = True
    fa, fb = judge.features(torch.from_numpy(np.stack([a, b])))  # one batch, as the recon-eval job
    row = im.compare(a, b, fa, fb, mask)
    assert set(row) == set(im.METRICS)
    assert (row["mse"], row["ssim"], row["psnr"]) == (im.mse_255(a, b), im.ssim(a, b), im.psnr(a, b))
    # Independent: each image through the judge on its own, numpy cosines, lower median (sorted[(n-1)//2]).
    ia, ib = (judge.features(torch.from_numpy(img[None]))[0].flatten(1).double().numpy() for img in (a, b))
    cos = (ia * ib).sum(0) / np.linalg.norm(ia, axis=0) / np.linalg.norm(ib, axis=0)
    assert row["cos_median"] == pytest.approx(np.sort(cos)[(81 - 1) // 2], abs=1e-5)  # float32 features
    assert row["cos_median_masked"] == pytest.approx(np.sort(cos[mask.ravel()])[(8 - 1) // 2], abs=1e-5)
    same = im.compare(a, a, fa, fa, np.zeros((9, 9), bool))
    assert same["psnr"] == math.inf and same["cos_median"] == pytest.approx(1, abs=1e-6)
    assert same["cos_median_masked"] == 0.0
    with pytest.raises(ValueError, match=r"mask: expected a bool array of the feature grid's shape \(9, 9\)"):
        im.compare(a, b, fa, fb, mask[:8])
    with pytest.raises(ValueError, match="feat_candidate: contains NaN"):
        im.compare(a, b, fa, fb * np.nan, mask)
    with pytest.raises(ValueError, match="candidate: shape"):
        im.compare(a, b[:100], fa, fb, mask)


def test_lpips_needs_a_local_alexnet_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"lpips_weights: no such file {tmp_path / 'alexnet.pth'}"):
        im.lpips_metric(tmp_path / "alexnet.pth")


def test_lpips_builds_offline_from_a_local_alexnet_and_matches_the_formula(tmp_path):
    from torchvision.models import alexnet

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in alexnet().state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    # Random convolutions; LPIPS never uses the classifier, stored as a broadcast zero (a 10 MB file).
    state = {k: (torch.randn(s, generator=gen) * 0.05 if k.startswith("features.") else torch.zeros(()).expand(s))
             for k, s in shapes.items()}
    torch.save(state, tmp_path / "alexnet.pth")
    metric = im.lpips_metric(tmp_path / "alexnet.pth")
    a, b = _images(7, (40, 40, 3))
    assert im.lpips_distance(metric, a, a) == 0.0
    # Independent LPIPS (Zhang et al.): scaled input, AlexNet ReLU outputs 1-5, unit-normalised over
    # channels, squared difference, the shipped linear heads, spatial mean, sum over layers.
    x, y = (torch.from_numpy(img).permute(2, 0, 1)[None].double() / 127.5 - 1 for img in (a, b))
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)
    x, y = (x - shift) / scale, (y - shift) / scale
    layers = [("conv", 0, 4, 2), ("pool+conv", 3, 1, 2), ("pool+conv", 6, 1, 1), ("conv", 8, 1, 1), ("conv", 10, 1, 1)]
    heads = [lin.model[-1].weight.double() for lin in metric.net.lins]
    total = 0.0
    for (kind, i, stride, pad), head in zip(layers, heads, strict=True):
        w, bias = state[f"features.{i}.weight"].double(), state[f"features.{i}.bias"].double()
        if kind == "pool+conv":
            x, y = (torch.nn.functional.max_pool2d(t, 3, 2) for t in (x, y))
        x, y = (torch.relu(torch.nn.functional.conv2d(t, w, bias, stride, pad)) for t in (x, y))
        nx, ny = (t / (t.pow(2).sum(1, keepdim=True).sqrt() + 1e-10) for t in (x, y))
        total += float(torch.nn.functional.conv2d((nx - ny) ** 2, head).mean())
    assert im.lpips_distance(metric, a, b) == pytest.approx(total, rel=1e-4)  # float32 network vs float64
