"""Image-space metrics of FeatMap's reconstruction evaluation (spec §7.2, the reference's eval_functions.py),
the change mask, and the noise control (FeatMap addendum).

Images are uint8 RGB arrays (H, W, 3). The two images of a comparison have the same size: the
reference resizes every reconstruction to the manipulated image's size with PIL's bicubic
(`resize_to`) before comparing. Definitions:

- mse: mean of the squared differences on the 0–255 scale, in float64 (skimage `mean_squared_error`).
- ssim: skimage `structural_similarity(a, b, channel_axis=-1, data_range=255)`: 7×7 uniform window,
  sample covariances, K1 = 0.01, K2 = 0.03, mean over the positions whose window lies inside the
  image and over the channels.
- psnr: skimage `peak_signal_noise_ratio(a, b, data_range=255)` = 10·log10(255² / mse); +inf (a
  float64 infinity, stored as such) for identical images.
- cos_median: both images through the judge backbone's preprocessing and layer
  (`BackboneProbe.features`, computed by the caller), the cosine of the C-vectors at every position
  (`featmap_ray.cosine.position_cosine`), the median over positions by `torch.median`'s rule
  (the lower middle value for an even count).
- cos_median_masked: the same median over the positions where the change mask is true; 0.0 when
  the mask is empty (as the reference).
- lpips: torchmetrics' LPIPS (AlexNet), only with a local AlexNet weight file (`lpips_metric`).
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import cv2
import numpy as np
import torch
from PIL import Image
from skimage.metrics import (
    mean_squared_error,
    peak_signal_noise_ratio,
    structural_similarity,
)

from featmap_ray.cosine import median_of_positions, position_cosine

CHANGE_THRESHOLD = 50.0  # on the L2 norm over RGB of the blurred images' absolute difference (0–255)
BLUR_KERNEL = (5, 5)
MEDIAN_RULE = "lower"  # torch.median, as the reference's evaluation
METRICS = ("mse", "ssim", "psnr", "cos_median", "cos_median_masked")


def _image(name: str, img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise ValueError(f"{name}: expected a uint8 image, got dtype {img.dtype}")
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"{name}: expected an RGB image of shape (H, W, 3), got {img.shape}")
    return img


def _pair(a: np.ndarray, b: np.ndarray, names: tuple[str, str] = ("a", "b")) -> tuple[np.ndarray, np.ndarray]:
    a, b = _image(names[0], a), _image(names[1], b)
    if a.shape != b.shape:
        raise ValueError(f"{names[1]}: shape {b.shape} differs from {names[0]}'s {a.shape} (resize_to first)")
    return a, b


def mse_255(a: np.ndarray, b: np.ndarray) -> float:
    return float(mean_squared_error(*_pair(a, b)))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    return float(structural_similarity(*_pair(a, b), channel_axis=-1, data_range=255))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = _pair(a, b)
    if np.array_equal(a, b):
        return math.inf  # skimage's value too, but with a divide-by-zero warning
    return float(peak_signal_noise_ratio(a, b, data_range=255))


def resize_to(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (height, width, 3) with PIL's bicubic; size is PIL's (width, height)."""
    img = _image("img", img)
    width, height = size
    if img.shape[:2] == (height, width):
        return img
    return np.asarray(Image.fromarray(img).resize((width, height), Image.BICUBIC))


def change_mask(original: np.ndarray, manipulated: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """The "changed region" of a manipulation on a (gh, gw) feature grid, as the reference's `get_mask`:

    the manipulated image resized to the original's size (cv2.resize, bilinear: the reference's call),
    both blurred with cv2.GaussianBlur(5×5, σ from the kernel size: 1.1), the absolute difference of
    the blurred uint8 images, its L2 norm over RGB > 50, then a cell is true when any of its pixels
    is. Cells are h//gh × w//gw pixels from the top-left corner; the remaining rows and columns at
    the bottom and right belong to no cell (the reference's grid is a fixed 9×9)."""
    original, manipulated = _image("original", original), _image("manipulated", manipulated)
    gh, gw = (int(g) for g in grid)
    h, w = original.shape[:2]
    if gh < 1 or gw < 1 or h < gh or w < gw:
        raise ValueError(f"grid: {grid} needs at least one pixel per cell of the original's {h}×{w}")
    if manipulated.shape != original.shape:
        manipulated = cv2.resize(manipulated, (w, h))
    diff = cv2.absdiff(cv2.GaussianBlur(original, BLUR_KERNEL, 0), cv2.GaussianBlur(manipulated, BLUR_KERNEL, 0))
    changed = np.linalg.norm(diff.astype(np.float32), axis=2) > CHANGE_THRESHOLD
    ch, cw = h // gh, w // gw
    return changed[:gh * ch, :gw * cw].reshape(gh, ch, gw, cw).any(axis=(1, 3))


def _features(name: str, x: np.ndarray | torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x).float()
    if x.ndim != 3:
        raise ValueError(f"{name}: expected a (C, H, W) feature map, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return x


def _mask(mask: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    mask = np.asarray(mask)
    if mask.dtype != bool or mask.shape != tuple(grid):
        raise ValueError(f"mask: expected a bool array of the feature grid's shape {tuple(grid)}, "
                         f"got {mask.dtype} {mask.shape}")
    return torch.from_numpy(mask.reshape(-1).copy())


def _masked_median(cos: torch.Tensor, mask: torch.Tensor) -> float:
    """(1, H·W) cosines, (H·W,) bool -> the lower median over the true positions; 0.0 when none."""
    if not mask.any():
        return 0.0
    return float(median_of_positions(cos[:, mask.to(cos.device)], MEDIAN_RULE)[0])


def masked_median_cosine(feat_a: np.ndarray | torch.Tensor, feat_b: np.ndarray | torch.Tensor,
                         mask: np.ndarray) -> float:
    """The median (lower rule) of the per-position cosine of two (C, H, W) maps over the positions
    where the (H, W) bool mask is true; 0.0 when the mask is empty."""
    a, b = _features("feat_a", feat_a), _features("feat_b", feat_b)
    if a.shape != b.shape:
        raise ValueError(f"feat_b: shape {tuple(b.shape)} differs from feat_a's {tuple(a.shape)}")
    return _masked_median(position_cosine(a[None], b[None]), _mask(mask, a.shape[1:]))


def noise_control(original: np.ndarray, mapped: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """original (C, H, W) + noise with ‖noise‖ = ‖mapped − original‖ over channels at every position.

    The direction at each position is a standard normal C-vector from `rng`, normalised; positions
    the mapping leaves unchanged get no noise. Computed in float64, returned as float32."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng: expected a numpy Generator (np.random.default_rng(seed)), got {type(rng).__name__}")
    original = _features("original", original).double().numpy()
    mapped = _features("mapped", mapped).double().numpy()
    if mapped.shape != original.shape:
        raise ValueError(f"mapped: shape {mapped.shape} differs from original's {original.shape}")
    change = np.linalg.norm(mapped - original, axis=0)
    direction = rng.standard_normal(original.shape)
    length = np.linalg.norm(direction, axis=0)
    scale = np.divide(change, length, out=np.zeros_like(change), where=length > 0)
    return (original + direction * scale).astype(np.float32)


def compare(reference: np.ndarray, candidate: np.ndarray, feat_reference: torch.Tensor, feat_candidate: torch.Tensor,
            mask: np.ndarray, lpips=None) -> dict[str, float]:
    """One comparison's row {mse, ssim, psnr, cos_median, cos_median_masked} (+ lpips when an
    `lpips_metric` is given) of two same-sized uint8 images and their judge feature maps (C, H, W)
    (`BackboneProbe.features` of the judge, one batch for every image of a pair); `mask` is the
    (H, W) change mask on that grid (`change_mask` of the original and manipulated images)."""
    reference, candidate = _pair(reference, candidate, ("reference", "candidate"))
    a, b = _features("feat_reference", feat_reference), _features("feat_candidate", feat_candidate)
    if a.shape != b.shape:
        raise ValueError(f"feat_candidate: shape {tuple(b.shape)} differs from feat_reference's {tuple(a.shape)}")
    cos = position_cosine(a[None], b[None])
    row = {"mse": mse_255(reference, candidate), "ssim": ssim(reference, candidate),
           "psnr": psnr(reference, candidate),
           "cos_median": float(median_of_positions(cos, MEDIAN_RULE)[0]),
           "cos_median_masked": _masked_median(cos, _mask(mask, a.shape[1:]))}
    if lpips is not None:
        row["lpips"] = lpips_distance(lpips, reference, candidate)
    return row


def lpips_metric(weights: str | Path, device: torch.device | str = "cpu"):
    """torchmetrics' `LearnedPerceptualImagePatchSimilarity(net_type="alex")` with the AlexNet backbone
    from a local torchvision state dict (alexnet-owt-7be5be79.pth); the linear heads ship with
    torchmetrics. Never downloads."""
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"evaluate.reconstruction.lpips_weights: no such file {path} (a torchvision "
                                "AlexNet state dict, alexnet-owt-7be5be79.pth)")
    # ~2 s to import: only with LPIPS.
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
    from torchvision.models import AlexNet_Weights

    # torchmetrics always asks torchvision for the pretrained AlexNet, which torch.hub loads from
    # <hub dir>/checkpoints/<file name of the URL> when it is there and downloads otherwise: point
    # the hub at a temporary directory that holds only the user's file under that name.
    name = Path(urlparse(AlexNet_Weights.DEFAULT.url).path).name
    previous = torch.hub.get_dir()
    with tempfile.TemporaryDirectory() as hub:
        os.makedirs(Path(hub, "checkpoints"))
        os.symlink(path.resolve(), Path(hub, "checkpoints", name))
        torch.hub.set_dir(hub)
        try:
            metric = LearnedPerceptualImagePatchSimilarity(net_type="alex")
        finally:
            torch.hub.set_dir(previous)
    return metric.to(device)


def lpips_distance(metric, a: np.ndarray, b: np.ndarray) -> float:
    """LPIPS of two uint8 images at full resolution, scaled to [−1, 1] (the reference's x/127.5 − 1)."""
    a, b = _pair(a, b)
    device = next(metric.parameters()).device
    x, y = (torch.from_numpy(img).permute(2, 0, 1)[None].float().div(127.5).sub(1).to(device) for img in (a, b))
    with torch.inference_mode():
        metric.update(x, y)
        score = float(metric.compute())
    metric.reset()  # the metric keeps every score until reset
    return score
