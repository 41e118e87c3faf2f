"""A deterministic corpus of good and bad image files, shared by several test modules.

``write_corpus(root)`` writes real files made with PIL/numpy and returns
``{relative_path: expected ImageDecodeError reason, or None for a good image}``.
``GOOD_SIZES`` gives each good image's (width, height) after EXIF transpose, and the
pattern helpers (``gradient_rgb``, ``EXIF_UPRIGHT`` ...) let tests check content.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, features

# (width, height) of every good image as decode_image must return it (upright).
GOOD_SIZES: dict[str, tuple[int, int]] = {
    "rgb.jpg": (96, 64),
    "rgb.png": (96, 64),
    "gray_L.png": (64, 48),
    "palette_P_transparency.png": (64, 48),
    "rgba.png": (64, 48),
    "gray_alpha_LA.png": (64, 48),
    "cmyk.jpg": (64, 64),
    "gray16.png": (256, 40),
    "rgb16.png": (48, 40),
    "gray16_bigendian.tif": (256, 40),
    "int32.tif": (64, 40),
    "float32.tif": (64, 40),
    "exif_orientation6.jpg": (120, 80),
    "exif_orientation8.jpg": (120, 80),
    "bilevel_1.png": (64, 64),
    "tiny_ok_40x40.png": (40, 40),
    "large_1200x800.jpg": (1200, 800),
    "animated.gif": (64, 48),
    "multipage.tif": (64, 48),
    "sub/UPPER_EXT.JPG": (96, 64),
    "lossless.webp": (96, 64),
}

BAD_REASONS: dict[str, str] = {
    "zero_bytes.jpg": "empty_file",
    "text_named.jpg": "not_an_image",
    "random_bytes.png": "not_an_image",
    "truncated.jpg": "truncated",
    "truncated.png": "truncated",
    "tiny_5x5.png": "too_small",
    "thin_20x120.png": "too_small",  # 6:1, within the aspect limit: refused for its shorter side
    "bomb.png": "decompression_bomb",  # header claims 30000x30000: PIL's DecompressionBombError
    "bomb_100mp.png": "decompression_bomb",  # 10000x10000: only PIL's DecompressionBombWarning
    # Hostile files: real, valid PNGs of a few KB whose resize used to need 1 GB / 100 GB.
    "elongated_32x100000.png": "aspect_ratio",
    "elongated_8x3000000.png": "aspect_ratio",  # also too small: the aspect ratio is checked first
    # Formats Pillow knows but no allow-list accepts, under image extensions (as an attacker names them).
    "eps_named.jpg": "format_not_allowed",
    "fits_named.png": "format_not_allowed",
    "ico_named.png": "format_not_allowed",
    "icns_named.png": "format_not_allowed",
}
# The Pillow format each refused format_not_allowed file is (its error message names it).
REFUSED_FORMATS = {"eps_named.jpg": "EPS", "fits_named.png": "FITS", "ico_named.png": "ICO", "icns_named.png": "ICNS"}

# Animated GIF / multi-page TIFF frame colours; decoding must give the first one.
FRAME_COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
# CMYK quadrants (top-left, top-right, bottom-left, bottom-right) and their RGB meaning.
CMYK_QUADRANTS = [((255, 0, 0, 0), (0, 255, 255)), ((0, 255, 0, 0), (255, 0, 255)),
                  ((0, 0, 255, 0), (255, 255, 0)), ((0, 0, 0, 255), (0, 0, 0))]


def gradient_rgb(width: int, height: int) -> np.ndarray:
    """HxWx3 uint8: red ramps left->right, green top->bottom, blue is a smooth wave (JPEG-friendly)."""
    yy, xx = np.mgrid[0:height, 0:width]
    red = np.rint(xx * 255 / max(width - 1, 1))
    green = np.rint(yy * 255 / max(height - 1, 1))
    blue = np.rint(127.5 + 127.5 * np.sin(xx / 9.0) * np.cos(yy / 7.0))
    return np.stack([red, green, blue], -1).astype(np.uint8)


def exif_upright() -> np.ndarray:
    """The 120x80 upright picture hidden in the EXIF-rotated JPEGs: grey, red top-left, blue bottom-right.

    Asymmetric, so any wrong rotation or mirror moves the red block away from the top-left.
    """
    a = np.full((80, 120, 3), 128, np.uint8)
    a[:20, :30] = (255, 0, 0)
    a[-20:, -30:] = (0, 0, 255)
    return a


def gray16_ramp() -> np.ndarray:
    """40x256 uint16 ramp covering exactly 0..65535 left to right."""
    return np.broadcast_to(np.linspace(0, 65535, 256).round().astype(np.uint16), (40, 256)).copy()


def rgb16_values() -> np.ndarray:
    """40x48x3 uint16 values of rgb16.png, spread over the full 16-bit range."""
    return (np.arange(40 * 48 * 3, dtype=np.uint64).reshape(40, 48, 3) * 11_111 % 65_536).astype(np.uint16)


def webp_supported() -> bool:
    return bool(features.check("webp"))


def write_corpus(root: Path) -> dict[str, str | None]:
    """Write every corpus file under ``root``; return {relative path: expected reason or None}."""
    root = Path(root)
    files: dict[str, bytes] = {}
    rgb = Image.fromarray(gradient_rgb(96, 64))

    # -- good images --------------------------------------------------------------
    files["rgb.jpg"] = encode(rgb, "JPEG", quality=95)
    files["rgb.png"] = encode(rgb, "PNG")
    files["sub/UPPER_EXT.JPG"] = files["rgb.jpg"]
    grey = Image.fromarray(gradient_rgb(64, 48)[:, :, 0])
    files["gray_L.png"] = encode(grey, "PNG")
    alpha = grey.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    files["gray_alpha_LA.png"] = encode(Image.merge("LA", [grey, alpha]), "PNG")
    rgba = Image.fromarray(gradient_rgb(64, 48)).convert("RGBA")
    rgba.putalpha(grey)
    files["rgba.png"] = encode(rgba, "PNG")
    files["palette_P_transparency.png"] = encode(
        Image.fromarray(gradient_rgb(64, 48)).quantize(16), "PNG", transparency=0)
    files["cmyk.jpg"] = encode(_cmyk_quadrants(), "JPEG", quality=95)
    files["gray16.png"] = encode(Image.fromarray(gray16_ramp()), "PNG")
    files["rgb16.png"] = _png_rgb16(rgb16_values())
    files["gray16_bigendian.tif"] = encode(
        Image.frombytes("I;16B", (256, 40), gray16_ramp().astype(">u2").tobytes()), "TIFF")
    # "I" beyond 16 bits -> min-max normalised; "F" within 0..200 -> kept as is.
    int32 = np.linspace(-1000, 1_000_000, 64 * 40).reshape(40, 64).astype(np.int32)
    files["int32.tif"] = encode(Image.fromarray(int32), "TIFF")
    float32 = np.linspace(0, 200, 64 * 40).reshape(40, 64).astype(np.float32)
    files["float32.tif"] = encode(Image.fromarray(float32), "TIFF")
    upright = Image.fromarray(exif_upright())
    # Orientation 6: viewers rotate 90 deg clockwise, so store it rotated counter-clockwise;
    # orientation 8 is the reverse.
    files["exif_orientation6.jpg"] = _exif_jpeg(upright.transpose(Image.Transpose.ROTATE_90), 6)
    files["exif_orientation8.jpg"] = _exif_jpeg(upright.transpose(Image.Transpose.ROTATE_270), 8)
    checker = (np.indices((64, 64)) // 8).sum(0) % 2 == 0
    files["bilevel_1.png"] = encode(Image.fromarray(checker), "PNG")
    files["tiny_ok_40x40.png"] = encode(Image.fromarray(gradient_rgb(40, 40)), "PNG")
    files["large_1200x800.jpg"] = encode(Image.fromarray(gradient_rgb(1200, 800)), "JPEG", quality=90)
    frames = [Image.new("RGB", (64, 48), c) for c in FRAME_COLOURS]
    files["animated.gif"] = encode(
        frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    files["multipage.tif"] = encode(frames[0], "TIFF", save_all=True, append_images=frames[1:])
    if webp_supported():
        files["lossless.webp"] = encode(rgb, "WEBP", lossless=True)

    # -- bad images ---------------------------------------------------------------
    files["zero_bytes.jpg"] = b""
    files["text_named.jpg"] = b"This is a text file that someone named .jpg\n" * 20
    files["random_bytes.png"] = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    big = Image.fromarray(gradient_rgb(256, 192))
    jpeg, png = encode(big, "JPEG", quality=90), encode(big, "PNG")
    files["truncated.jpg"] = jpeg[: len(jpeg) // 2]
    files["truncated.png"] = png[: len(png) * 6 // 10]
    files["tiny_5x5.png"] = encode(Image.fromarray(gradient_rgb(5, 5)), "PNG")
    files["thin_20x120.png"] = encode(Image.fromarray(gradient_rgb(120, 20)), "PNG")
    one_pixel = encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG")
    files["bomb.png"] = patch_png_size(one_pixel, 30_000, 30_000)
    files["bomb_100mp.png"] = patch_png_size(one_pixel, 10_000, 10_000)
    files["elongated_32x100000.png"] = blank_png(32, 100_000)
    files["elongated_8x3000000.png"] = blank_png(8, 3_000_000)
    files.update(refused_format_files())

    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return {rel: BAD_REASONS.get(rel) for rel in files}


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _cmyk_quadrants() -> Image.Image:
    img = Image.new("CMYK", (64, 64))
    for (cmyk, _), (x, y) in zip(CMYK_QUADRANTS, [(0, 0), (32, 0), (0, 32), (32, 32)]):
        img.paste(cmyk, (x, y, x + 32, y + 32))
    return img


def _exif_jpeg(stored: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation tag
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes())


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_rgb16(values: np.ndarray) -> bytes:
    """A 48-bit RGB PNG written by hand: PIL cannot save 16-bit-per-channel RGB."""
    h, w, _ = values.shape
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in values)  # filter type 0 per row
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)  # bit depth 16, colour type 2 (RGB)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b""))


def blank_png(width: int, height: int) -> bytes:
    """A valid black 1-bit greyscale PNG written by hand: every row is zeros, so even 8 x 3,000,000
    pixels compress to a few KB (and take milliseconds to write)."""
    raw = (b"\x00" + bytes((width + 7) // 8)) * height  # filter type 0, then the row's packed bits
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, colour type 0 (grey)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(raw, 9)) + _png_chunk(b"IEND", b""))


def eps_file() -> bytes:
    """A minimal EPS: Pillow's EPS plugin would run Ghostscript to load it."""
    return (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n%%EndComments\n"
            b"newpath 0 0 moveto 64 64 lineto stroke\nshowpage\n%%EOF\n")


def fits_file() -> bytes:
    """A minimal 64x64 8-bit FITS: 80-byte header cards padded to 2880 bytes, then the data."""
    cards = [b"SIMPLE  =                    T", b"BITPIX  =                    8", b"NAXIS   =                    2",
             b"NAXIS1  =                   64", b"NAXIS2  =                   64", b"END"]
    return b"".join(c.ljust(80) for c in cards).ljust(2880) + bytes(64 * 64).ljust(2880, b"\x00")


def refused_format_files() -> dict[str, bytes]:
    """{name: bytes} of the REFUSED_FORMATS files (named as images, the content another format)."""
    icon = Image.new("RGB", (64, 64), (200, 30, 30))  # one colour: ICNS stores it up to 1024x1024, as PNGs
    return {"eps_named.jpg": eps_file(), "fits_named.png": fits_file(), "ico_named.png": encode(icon, "ICO"),
            "icns_named.png": encode(icon, "ICNS")}


def patch_png_size(png: bytes, width: int, height: int) -> bytes:
    """Rewrite the IHDR of a real PNG to claim width x height, with a valid CRC.

    The file stays tiny on disk, but its header announces a decompression bomb.
    """
    data = bytearray(png)
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)
