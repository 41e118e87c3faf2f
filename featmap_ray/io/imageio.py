"""Robust decoding of user image files to RGB, torchvision-equivalent resizing, lossless PNG.

User folders contain anything: truncated downloads, text files named ``.jpg``,
decompression bombs, 16-bit scans, CMYK prints, EXIF-rotated phone photos, and hostile
files: an EPS renamed ``.png`` (Pillow would start Ghostscript on it), a 10 KB PNG of
8 x 3,000,000 pixels. ``decode_image`` turns every such file either into a fully loaded,
upright RGB ``PIL.Image`` or into an ``ImageDecodeError`` with a machine-friendly ``reason``,
so callers can skip and count bad files instead of crashing a whole job. Only the Pillow
plugins of an allow-list of formats ever parse a file.

``resize_center_crop`` gives torchvision's ``Compose([Resize(size), CenterCrop(size)])`` on
PIL images (to rounding) without importing torch, with work and memory bounded by the output.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence

import numpy as np
import PIL
from PIL import Image, ImageOps, UnidentifiedImageError

from featmap_ray.config import INGEST_FORMATS

__all__ = [
    "ImageDecodeError",
    "decode_image",
    "resize_center_crop",
    "encode_png",
    "decode_png_rgb",
]

# PIL's own default Image.MAX_IMAGE_PIXELS (~ 1024 * 1024 * 1024 // 4 // 3).
DEFAULT_MAX_PIXELS = 89_478_485
# Longer side / shorter side beyond which an image is refused from its header.
DEFAULT_MAX_ASPECT = 10.0
# Pillow format names opened by default: ingest's. Never EPS (Ghostscript), FITS, ICNS, ICO.
DEFAULT_FORMATS = tuple(INGEST_FORMATS)
_PILLOW_MAJOR = int(PIL.__version__.split(".")[0])

# PIL's OSError messages when the data ends early all contain this word: "image file is
# truncated (N bytes not processed)", "Truncated File Read". ("broken data stream when
# reading image file" is PIL's decoder status for *corrupt* data, so it is a decode_error.)
_TRUNCATION_MARKER = "truncated"


class ImageDecodeError(ValueError):
    """An image that cannot be used; `reason` is a short machine-friendly code, str(e) a human message.

    reason is one of: "empty_file", "not_an_image", "format_not_allowed" (a file of a format that
    Pillow knows but the allow-list excludes, e.g. EPS), "truncated", "decompression_bomb",
    "aspect_ratio" (longer/shorter side beyond max_aspect), "too_small", "unsupported_mode",
    "decode_error".
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
    max_aspect: float = DEFAULT_MAX_ASPECT,
    formats: Sequence[str] = DEFAULT_FORMATS,
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
    - Only the Pillow plugins of ``formats`` (Pillow format names) parse the file. A file
      another Pillow plugin would recognise from its first 16 bytes (EPS, FITS, ICO ...) is
      refused as "format_not_allowed" without running that plugin; anything else
      unidentified is "not_an_image".
    - Images with more than ``max_pixels`` pixels, a longer/shorter side ratio above
      ``max_aspect`` or a shorter side under ``min_side`` are refused from the header,
      before any pixel is decoded (in that order). PIL's global ``Image.MAX_IMAGE_PIXELS``
      check is also turned into "decompression_bomb", so the effective limit is the smaller of the two.

    Raises ImageDecodeError whose message names ``source`` and what was wrong.
    """
    name = source or "<image bytes>"
    if not data:
        raise ImageDecodeError("empty_file", f"{name}: file is empty (0 bytes)")
    try:
        # Local filter only: makes PIL's bomb *warning* raise, without touching global state.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=list(formats))
            _check_size(img.size, max_pixels=max_pixels, max_aspect=max_aspect, min_side=min_side, name=name)
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # no copy when nothing to rotate
            return _to_rgb(img, name)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ImageDecodeError("decompression_bomb", f"{name}: {e}") from e
    except UnidentifiedImageError as e:  # subclass of OSError, so it must come first
        other = _recognised_format(data, formats)
        if other is not None:
            message = f"{name}: {other} images are not accepted here (accepted: {', '.join(formats)})"
            raise ImageDecodeError("format_not_allowed", message) from e
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


def _recognised_format(data: bytes, allowed: Sequence[str]) -> str | None:
    """The first registered Pillow format outside ``allowed`` whose ``accept`` check recognises the file.

    Only the plugins' accept functions run: they look at the first 16 bytes (what ``Image.open``
    gives them) and never open, parse or load anything, so no Ghostscript or other decoder starts.
    Plugins without an accept function (they would claim any bytes) are skipped.
    """
    Image.init()  # registers every plugin (imports the modules; runs none of them)
    prefix, allowed = data[:16], {f.upper() for f in allowed}
    for fmt in Image.ID:
        if fmt in allowed:
            continue
        _, accept = Image.OPEN[fmt]
        try:
            if accept is not None and accept(prefix):
                return fmt
        except Exception:  # a check that cannot cope with a short prefix: not recognised
            continue
    return None


def _check_size(size: tuple[int, int], *, max_pixels: int, max_aspect: float, min_side: int, name: str) -> None:
    w, h = size
    if w * h > max_pixels:
        raise ImageDecodeError(
            "decompression_bomb",
            f"{name}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}"
            " (possible decompression bomb)",
        )
    # Before min_side: an 8 x 3,000,000 image is above all too elongated. (A resize to a square
    # costs little either way, see resize_center_crop; the limit keeps the decoded source small.)
    short, long = min(w, h), max(w, h)
    if short > 0 and long / short > max_aspect:
        raise ImageDecodeError(
            "aspect_ratio",
            f"{name}: {w}x{h} has an aspect ratio of {long / short:.1f}:1, beyond the limit of {max_aspect:g}:1",
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


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision ``Compose([Resize(size), CenterCrop(size)])`` on a PIL image: a size x size image.

    Resize: shorter side -> size, the long side ``int(size * long / short)`` (torchvision's
    ``_compute_resized_output_size``), BILINEAR with PIL's antialiasing, an image already at that
    size unchanged. CenterCrop: offsets ``int(round((side - size) / 2.0))`` (no padding is ever
    needed after that resize). Instead of resizing the whole image, the crop is mapped back to
    source coordinates and only it is resampled (``resize(box=...)``), so work and memory are
    bounded by the output: an 8 x 3,000,000 image does not become a 288 x 108,000,000 intermediate.

    PIL reads the same source pixels with the same filter either way (its filter windows are clipped
    at the source image's edges, not the box's). The two passes run explicitly, in the order PIL
    picks for the whole-image resize (see ``_vertical_first``): in one call with a box, PIL would
    pick its order from the box's sizes, and the 8-bit intermediate it rounds would differ. What
    remains is the box's float32 arithmetic: a pixel may differ by one level, rarely
    (tests/test_imageio.py bounds it against torchvision).
    """
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    if (new_w, new_h) == (w, h):  # torchvision's Resize returns the image itself: a plain crop, exact
        return img.crop((left, top, left + size, top + size))
    x0, x1 = _source_span(left, size, w, new_w)
    y0, y1 = _source_span(top, size, h, new_h)
    # First pass over just the source columns / rows the second pass reads. Its resize along the other
    # axis is an identity (integer offset, scale 1): exact, whichever order PIL runs that call in.
    if _vertical_first(w, h, new_w, new_h):
        c0, c1 = _window(x0, x1, w, new_w)
        cols = img.resize((c1 - c0, size), Image.BILINEAR, box=(c0, y0, c1, y1))
        return cols.resize((size, size), Image.BILINEAR, box=(x0 - c0, 0, x1 - c0, size))
    r0, r1 = _window(y0, y1, h, new_h)
    rows = img.resize((size, r1 - r0), Image.BILINEAR, box=(x0, r0, x1, r1))
    return rows.resize((size, size), Image.BILINEAR, box=(0, y0 - r0, size, y1 - r0))


def _vertical_first(w: int, h: int, new_w: int, new_h: int) -> bool:
    """Whether PIL's resize of the whole w x h image to new_w x new_h runs its vertical pass first:
    Pillow >= 13 does when the height loses more than twice as many rows as the width loses columns
    (src/libImaging/Resample.c, python-pillow/Pillow#9549); older Pillow always runs the horizontal pass first."""
    return _PILLOW_MAJOR >= 13 and 0 < h - new_h and h - new_h > 2 * (w - new_w)


def _window(lo: float, hi: float, side: int, new_side: int) -> tuple[int, int]:
    """The source lines [first, last) that BILINEAR windows centred in [lo, hi] read along a side resized
    from ``side`` to ``new_side``: a window reaches ``support`` lines either side of its centre; one more
    line of margin each way, so that only the image's own edges clip a window, as in the whole-image resize."""
    support = max(side / new_side, 1.0)
    return max(0, math.floor(lo - support) - 1), min(side, math.ceil(hi + support) + 1)


def _source_span(start: int, size: int, side: int, new_side: int) -> tuple[float, float]:
    """Where resized pixels [start, start + size) of a side resized from ``side`` to ``new_side`` lie in
    the source, as PIL maps them (scale side / new_side); kept inside [0, side] against float rounding."""
    if start == 0 and size == new_side:  # the whole side (the shorter one): exact bounds
        return 0.0, float(side)
    scale = side / new_side
    return max(0.0, start * scale), min(float(side), (start + size) * scale)


def media_type(fmt: str) -> str:
    """The media type Pillow registers for one of its format names (e.g. "PNG" -> "image/png")."""
    Image.init()
    return Image.MIME[fmt]


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
