"""Robust decoding of user image files to RGB, torchvision-exact resizing, lossless PNG.

User folders contain anything: truncated downloads, text files named ``.jpg``,
decompression bombs, 16-bit scans, CMYK prints, EXIF-rotated phone photos.
``decode_image`` turns every such file either into a fully loaded, upright RGB
``PIL.Image`` or into an ``ImageDecodeError`` with a machine-friendly ``reason``,
so callers can skip and count bad files instead of crashing a whole job.

``resize_shorter_side`` / ``center_crop`` reproduce ``torchvision.transforms.Resize(size)``
and ``CenterCrop(size)`` on PIL images pixel for pixel, without importing torch.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "ImageDecodeError",
    "decode_image",
    "resize_shorter_side",
    "center_crop",
    "resize_center_crop",
    "encode_png",
    "decode_png_rgb",
]

# PIL's own default Image.MAX_IMAGE_PIXELS (~ 1024 * 1024 * 1024 // 4 // 3).
DEFAULT_MAX_PIXELS = 89_478_485

# PIL's OSError messages when the data ends early all contain this word: "image file is
# truncated (N bytes not processed)", "Truncated File Read". ("broken data stream when
# reading image file" is PIL's decoder status for *corrupt* data, so it is a decode_error.)
_TRUNCATION_MARKER = "truncated"


class ImageDecodeError(ValueError):
    """An image that cannot be used; `reason` is a short machine-friendly code, str(e) a human message.

    reason is one of: "empty_file", "not_an_image", "truncated", "decompression_bomb",
    "too_small", "unsupported_mode", "decode_error".
    """

    reason: str

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[type[ImageDecodeError], tuple[str, str]]:
        # Default exception pickling would call cls(message) and lose `reason`;
        # Ray pickles exceptions between workers, so keep both.
        return (type(self), (self.reason, str(self)))


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = 32,
    source: str = "",
) -> Image.Image:
    """Decode image file bytes into a fully loaded, upright RGB image.

    - The first frame of multi-frame files (GIF, TIFF, APNG) is used.
    - EXIF orientation is applied, so rotated phone photos come out upright.
    - Alpha is dropped (not composited), exactly like torchvision's ImageFolder
      loader ``img.convert("RGB")``; palettes and CMYK/YCbCr/LAB/HSV/1-bit go
      through PIL's convert. 16-bit and 32-bit grey images are scaled to 0..255
      (see ``_high_depth_to_uint8``) because PIL's convert clips them.
    - 16-bit-per-channel RGB PNGs are opened by PIL as 8-bit "RGB" (high byte).
    - Images with more than ``max_pixels`` pixels are refused from the header,
      before any pixel is decoded. PIL's global ``Image.MAX_IMAGE_PIXELS`` check
      is also turned into this error, so the effective limit is the smaller of the two.

    Raises ImageDecodeError whose message names ``source`` and what was wrong.
    """
    name = source or "<image bytes>"
    if not data:
        raise ImageDecodeError("empty_file", f"{name}: file is empty (0 bytes)")
    try:
        # Local filter only: makes PIL's bomb *warning* raise, without touching global state.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            _check_size(img.size, max_pixels=max_pixels, min_side=min_side, name=name)
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # no copy when nothing to rotate
            return _to_rgb(img, name)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ImageDecodeError("decompression_bomb", f"{name}: {e}") from e
    except UnidentifiedImageError as e:  # subclass of OSError, so it must come first
        raise ImageDecodeError("not_an_image", f"{name}: not a recognised image file") from e
    except MemoryError:
        raise  # the machine's problem, not the file's
    except OSError as e:
        if _TRUNCATION_MARKER in str(e).lower():
            raise ImageDecodeError("truncated", f"{name}: file is truncated ({e})") from e
        raise ImageDecodeError("decode_error", f"{name}: cannot decode image ({e})") from e
    except Exception as e:
        message = f"{name}: cannot decode image ({type(e).__name__}: {e})"
        raise ImageDecodeError("decode_error", message) from e


def _check_size(size: tuple[int, int], *, max_pixels: int, min_side: int, name: str) -> None:
    w, h = size
    if w * h > max_pixels:
        raise ImageDecodeError(
            "decompression_bomb",
            f"{name}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}"
            " (possible decompression bomb)",
        )
    if min(w, h) < min_side:
        raise ImageDecodeError("too_small", f"{name}: {w}x{h} is too small (shorter side < {min_side})")


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        grey = _high_depth_to_uint8(np.asarray(img), sixteen_bit=img.mode.startswith("I;16"))
        return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))
    try:
        return img.convert("RGB")
    except ValueError as e:  # PIL has no conversion path for this mode (e.g. "La")
        message = f"{name}: image mode {img.mode!r} cannot be converted to RGB"
        raise ImageDecodeError("unsupported_mode", message) from e


def _high_depth_to_uint8(a: np.ndarray, *, sixteen_bit: bool) -> np.ndarray:
    """Map 16-bit / 32-bit int / float grey values to uint8 instead of clipping at 255.

    16-bit data: 0..65535 -> 0..255 (divide by 257, round). "I"/"F" data: kept if
    already in 0..255, treated as 16-bit if in 0..65535, otherwise min-max normalised.
    """
    x = np.nan_to_num(a.astype(np.float64))
    if not sixteen_bit:
        lo, hi = float(x.min()), float(x.max())
        if lo >= 0 and hi <= 255:
            return np.rint(x).astype(np.uint8)
        if lo < 0 or hi > 65535:
            x = (x - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(x)
            return np.rint(x).astype(np.uint8)
    return np.rint(x / 257.0).astype(np.uint8)


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    """torchvision ``Resize(size)`` on a PIL image: shorter side -> size, aspect kept.

    Same arithmetic as torchvision's ``_compute_resized_output_size``: the long side
    is ``int(size * long / short)`` (truncation), and an image already at the target
    size is returned unchanged. BILINEAR with PIL's built-in antialiasing.
    """
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), Image.BILINEAR)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision ``CenterCrop(size)`` on a PIL image, including its zero padding.

    Offsets are ``int(round((side - size) / 2.0))`` (Python's round: half to even).
    Along a side shorter than ``size`` torchvision pads ``(size - side) // 2`` zeros
    before the image; PIL's crop fills outside the image with zeros, so a negative
    offset of that amount gives the same pixels.
    """
    w, h = img.size
    left = int(round((w - size) / 2.0)) if size <= w else -((size - w) // 2)
    top = int(round((h - size) / 2.0)) if size <= h else -((size - h) // 2)
    return img.crop((left, top, left + size, top + size))


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """``Compose([Resize(size), CenterCrop(size)])``: a size x size image."""
    return center_crop(resize_shorter_side(img, size), size)


def encode_png(img: Image.Image) -> bytes:
    """Lossless PNG bytes of an RGB image (other modes are refused, not silently converted)."""
    if img.mode != "RGB":
        raise ValueError(f"encode_png expects an RGB image, got mode {img.mode!r}")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def decode_png_rgb(data: bytes) -> np.ndarray:
    """Decode a stored RGB PNG (as written by ``encode_png``) to a writable HxWx3 uint8 array."""
    with Image.open(io.BytesIO(data)) as img:
        if img.format != "PNG" or img.mode != "RGB":
            raise ValueError(f"expected an RGB PNG, got format {img.format!r} mode {img.mode!r}")
        # np.asarray on a PIL image is read-only in recent Pillow; np.array copies.
        return np.array(img)
