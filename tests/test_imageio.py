"""Tests for featmap_ray.imageio: the image corpus, torchvision-exact resize/crop, PNG round trip."""

from __future__ import annotations

import io
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile
from torchvision import transforms as T

from featmap_ray.io.imageio import (
    ImageDecodeError,
    _to_rgb,
    decode_image,
    decode_png_rgb,
    encode_png,
    resize_center_crop,
)
from tests.image_corpus import (
    BAD_REASONS,
    CMYK_QUADRANTS,
    FRAME_COLOURS,
    GOOD_SIZES,
    REFUSED_FORMATS,
    blank_png,
    encode,
    exif_upright,
    gradient_rgb,
    gray16_ramp,
    patch_png_size,
    refused_format_files,
    rgb16_values,
    webp_supported,
    write_corpus,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str | None]]:
    root = tmp_path_factory.mktemp("corpus")
    return root, write_corpus(root)


def _decode(corpus: tuple[Path, dict[str, str | None]], rel: str) -> np.ndarray:
    root, entries = corpus
    assert rel in entries, f"{rel} not in this corpus: this Pillow cannot write its format (make setup installs one that can)"
    img = decode_image((root / rel).read_bytes(), source=rel)
    assert img.mode == "RGB"
    return np.asarray(img)


def _mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# -- corpus: every entry ---------------------------------------------------------------


def test_corpus_lists_every_file(corpus):
    root, entries = corpus
    expected = set(GOOD_SIZES) | set(BAD_REASONS)
    if not webp_supported():
        expected.discard("lossless.webp")
    assert set(entries) == expected
    assert all((root / rel).is_file() for rel in entries)
    assert {rel: r for rel, r in entries.items() if r is not None} == BAD_REASONS


@pytest.mark.parametrize("rel", sorted(GOOD_SIZES))
def test_good_image_decodes_to_rgb_of_expected_size(corpus, rel):
    arr = _decode(corpus, rel)
    w, h = GOOD_SIZES[rel]
    assert arr.shape == (h, w, 3) and arr.dtype == np.uint8


@pytest.mark.parametrize("rel", sorted(BAD_REASONS))
def test_bad_image_raises_with_reason_and_source(corpus, rel):
    root, _ = corpus
    with pytest.raises(ImageDecodeError) as info:
        decode_image((root / rel).read_bytes(), source=rel)
    assert info.value.reason == BAD_REASONS[rel]
    assert rel in str(info.value)


# -- corpus: content of good images ------------------------------------------------------


def test_lossless_formats_are_exact(corpus):
    assert np.array_equal(_decode(corpus, "rgb.png"), gradient_rgb(96, 64))
    assert np.array_equal(_decode(corpus, "tiny_ok_40x40.png"), gradient_rgb(40, 40))
    assert np.array_equal(_decode(corpus, "lossless.webp"), gradient_rgb(96, 64))


@pytest.mark.parametrize("rel", ["rgb.jpg", "sub/UPPER_EXT.JPG"])
def test_jpeg_is_close(corpus, rel):
    assert _mean_abs_diff(_decode(corpus, rel), gradient_rgb(96, 64)) < 3


def test_large_jpeg_is_close(corpus):
    assert _mean_abs_diff(_decode(corpus, "large_1200x800.jpg"), gradient_rgb(1200, 800)) < 3


def test_greyscale_becomes_equal_channels(corpus):
    grey = gradient_rgb(64, 48)[..., 0]
    for rel in ["gray_L.png", "gray_alpha_LA.png"]:  # LA: alpha (a mirrored ramp) is dropped
        arr = _decode(corpus, rel)
        assert all(np.array_equal(arr[..., c], grey) for c in range(3)), rel


def test_rgba_alpha_is_dropped_not_composited(corpus):
    # Same as torchvision's ImageFolder loader: transparent pixels keep their colour.
    assert np.array_equal(_decode(corpus, "rgba.png"), gradient_rgb(64, 48))


def test_palette_with_transparency_keeps_palette_colours(corpus):
    root, _ = corpus
    with Image.open(root / "palette_P_transparency.png") as src:
        assert src.mode == "P" and src.info["transparency"] == 0
        palette = np.array(src.getpalette(), np.uint8).reshape(-1, 3)
        expected = palette[np.asarray(src)]
    assert np.array_equal(_decode(corpus, "palette_P_transparency.png"), expected)


def test_cmyk_colours(corpus):
    arr = _decode(corpus, "cmyk.jpg")
    for (_, rgb), (x, y) in zip(CMYK_QUADRANTS, [(16, 16), (48, 16), (16, 48), (48, 48)]):
        assert np.abs(arr[y, x].astype(int) - rgb).max() <= 20, (rgb, arr[y, x])


@pytest.mark.parametrize("rel", ["gray16.png", "gray16_bigendian.tif"])
def test_16bit_grey_uses_full_range(corpus, rel):
    arr = _decode(corpus, rel)
    assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])
    row = arr[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255
    assert np.all(np.diff(row) >= 0) and len(np.unique(row)) > 200  # monotone, not clipped at 255
    assert np.array_equal(arr[..., 0], np.rint(gray16_ramp() / 257).astype(np.uint8))


def test_16bit_rgb_png(corpus):
    # Pillow opens a 48-bit PNG directly as 8-bit "RGB", keeping the high byte of each sample.
    root, _ = corpus
    with Image.open(root / "rgb16.png") as src:
        assert src.mode == "RGB"
    arr = _decode(corpus, "rgb16.png")
    values = rgb16_values()
    assert np.array_equal(arr, (values >> 8).astype(np.uint8))
    assert np.abs(arr.astype(int) - np.rint(values / 257)).max() <= 1


def test_32bit_int_and_float_tiffs(corpus):
    # int32 spans -1000..1e6: min-max normalised; float32 spans 0..200: kept as is.
    ints = _decode(corpus, "int32.tif")[..., 0].ravel().astype(int)
    assert ints[0] == 0 and ints[-1] == 255 and np.all(np.diff(ints) >= 0)
    floats = _decode(corpus, "float32.tif")[..., 0]
    assert np.array_equal(floats, np.rint(np.linspace(0, 200, 64 * 40, dtype=np.float32)).reshape(40, 64))


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0, 7, 255], [0, 7, 255]),  # already 8-bit range: kept
        ([0, 257, 65535], [0, 1, 255]),  # 16-bit range: / 257
        ([-10, 0, 990], [0, 3, 255]),  # anything else: min-max
    ],
)
def test_int32_mode_scaling_rules(values, expected):
    img = Image.fromarray(np.array([values] * 32, np.int32).repeat(11, axis=1))
    assert img.mode == "I"
    arr = np.asarray(decode_image(encode(img, "TIFF")))
    assert arr[0, ::11, 0].tolist() == expected


@pytest.mark.parametrize("rel", ["exif_orientation6.jpg", "exif_orientation8.jpg"])
def test_exif_rotated_photo_comes_out_upright(corpus, rel):
    arr = _decode(corpus, rel)
    assert _mean_abs_diff(arr, exif_upright()) < 3
    assert np.abs(arr[10, 15].astype(int) - (255, 0, 0)).max() <= 10  # red block top-left
    assert np.abs(arr[-10, -15].astype(int) - (0, 0, 255)).max() <= 10  # blue block bottom-right


def test_bilevel_image(corpus):
    arr = _decode(corpus, "bilevel_1.png")
    checker = (np.indices((64, 64)) // 8).sum(0) % 2 == 0
    assert np.array_equal(arr[..., 0], np.where(checker, 255, 0))


@pytest.mark.parametrize("rel", ["animated.gif", "multipage.tif"])
def test_multi_frame_file_uses_first_frame(corpus, rel):
    arr = _decode(corpus, rel)
    assert np.all(arr == FRAME_COLOURS[0])


# -- decode_image: limits, errors, global state --------------------------------------------


def test_limits_are_parameters(corpus):
    root, _ = corpus
    data = (root / "rgb.png").read_bytes()  # 96x64
    assert decode_image(data, max_pixels=96 * 64).size == (96, 64)
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, max_pixels=96 * 64 - 1, source="x.png")
    assert info.value.reason == "decompression_bomb" and "x.png" in str(info.value)
    with pytest.raises(ImageDecodeError, match="too small") as info:
        decode_image(data, min_side=65)
    assert info.value.reason == "too_small"
    assert decode_image((root / "tiny_5x5.png").read_bytes(), min_side=1).size == (5, 5)
    assert decode_image(data, max_aspect=1.5).size == (96, 64)  # 96/64 = 1.5: at the limit is allowed
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, max_aspect=1.4, source="x.png")
    assert info.value.reason == "aspect_ratio"
    assert all(s in str(info.value) for s in ("x.png", "96x64", "1.5:1", "1.4:1"))


def test_bomb_is_refused_from_the_header():
    # 8000x8000 is under PIL's own limit and the pixel data is 1 pixel: had decode_image
    # decoded before checking, it would report "truncated", not "decompression_bomb".
    bomb = patch_png_size(encode(Image.new("RGB", (1, 1)), "PNG"), 8000, 8000)
    with pytest.raises(ImageDecodeError) as info:
        decode_image(bomb, max_pixels=1_000_000, source="b.png")
    assert info.value.reason == "decompression_bomb" and "8000x8000" in str(info.value)
    with pytest.raises(ImageDecodeError) as info:
        decode_image(bomb, max_pixels=10**8)
    assert info.value.reason == "truncated"


def test_decoding_leaves_global_state_alone(corpus):
    root, _ = corpus
    filters, max_pixels = list(warnings.filters), Image.MAX_IMAGE_PIXELS
    for rel in ["bomb.png", "bomb_100mp.png", "truncated.jpg"]:
        with pytest.raises(ImageDecodeError):
            decode_image((root / rel).read_bytes())
    assert warnings.filters == filters
    assert Image.MAX_IMAGE_PIXELS == max_pixels and ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_corrupt_data_is_a_decode_error():
    # Corrupt (not short) GIF data: PIL says "broken data stream when reading image file".
    data = bytearray(encode(Image.fromarray(gradient_rgb(64, 48)), "GIF"))
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64
    with pytest.raises(ImageDecodeError) as info:
        decode_image(bytes(data), source="c.gif")
    assert info.value.reason == "decode_error" and "c.gif" in str(info.value)


def test_mode_without_rgb_conversion_is_unsupported():
    with pytest.raises(ImageDecodeError) as info:
        _to_rgb(Image.new("La", (40, 40)), "la.tif")
    assert info.value.reason == "unsupported_mode" and "la.tif" in str(info.value)


def test_message_without_source_and_pickling():
    with pytest.raises(ImageDecodeError) as info:
        decode_image(b"")
    assert "<image bytes>" in str(info.value)
    # Ray ships exceptions between processes: reason and message must survive pickling.
    copy = pickle.loads(pickle.dumps(info.value))
    assert (copy.reason, str(copy)) == ("empty_file", str(info.value))


# -- resize + crop: against torchvision ----------------------------------------------------
#
# resize_center_crop resamples only the crop, from source coordinates; torchvision resizes the whole image and
# crops. PIL reads the same source pixels with the same weights either way, but the crop box it is given is
# float32, so a weight can differ in its last bits and a pixel whose exact value lies next to a rounding
# boundary comes out one level off. Measured over 266 cases (19 sizes x 7 targets, noise and smooth images):
# max 1 level, at most 2.1 % of a crop's values (mean 0.021, on noise), 0.08 % of all values. The bounds below
# hold that: one level, mean <= 0.05. Where torchvision's Resize is a no-op (shorter side already at size)
# the result is a plain crop: exact.


def _noise_image(w: int, h: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _smooth_image(w: int, h: int) -> Image.Image:
    return Image.fromarray(gradient_rgb(w, h))


def _torchvision(img: Image.Image, size: int) -> np.ndarray:
    return np.asarray(T.Compose([T.Resize(size), T.CenterCrop(size)])(img)).astype(np.int16)


# landscape, portrait, square, odd sizes, elongated both ways (31x999: 32:1), 10:1 (at the ingest limit),
# downscaling (500x375, 1200x800 -> 97) and upscaling (64x64, 37x530 -> 255)
IMAGE_SIZES = [(333, 257), (257, 333), (500, 375), (101, 99), (64, 64), (225, 224), (999, 31), (37, 530),
               (1200, 800), (300, 3000), (3000, 300)]
TARGETS = [224, 32, 97, 255]


@pytest.mark.parametrize("wh", IMAGE_SIZES)
@pytest.mark.parametrize("size", TARGETS)
@pytest.mark.parametrize("make", [_noise_image, _smooth_image])
def test_resize_center_crop_matches_torchvision(wh, size, make):
    img = make(*wh)
    out = resize_center_crop(img, size)
    assert out.size == (size, size) and out.mode == "RGB"
    diff = np.abs(np.asarray(out).astype(np.int16) - _torchvision(img, size))
    assert diff.max() <= 1 and diff.mean() <= 0.05, (diff.max(), diff.mean())


@pytest.mark.parametrize("wh", [(97, 97), (97, 140), (301, 97), (98, 97)])
def test_no_resize_needed_is_an_exact_crop(wh):
    # Shorter side already at size: torchvision's Resize returns the image, and CenterCrop crops it
    # (extract feeds stored image_size originals to a backbone of the same input size this way).
    img = _noise_image(*wh)
    assert np.array_equal(np.asarray(resize_center_crop(img, 97)).astype(np.int16), _torchvision(img, 97))


def test_elongated_image_is_resized_from_the_crop_only():
    # 32x100,000 (allowed here by max_aspect): torchvision's whole-image resize to 288 builds a
    # 288x900,000 intermediate (about 1 GB); the crop alone is 32 source rows.
    img = decode_image(blank_png(32, 100_000), max_aspect=float("inf"))
    out = resize_center_crop(img, 288)
    assert out.size == (288, 288) and not np.asarray(out).any()


# -- hostile files: refused from the header or by format, without decoding or running anything --------------


@pytest.mark.parametrize(("wh", "ratio"), [((32, 100_000), "3125.0:1"), ((8, 3_000_000), "375000.0:1")])
def test_elongated_png_is_refused_from_the_header(wh, ratio):
    data = blank_png(*wh)
    assert len(data) < 10_000  # a few KB on disk
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, source="long.png")
    assert info.value.reason == "aspect_ratio"
    assert all(s in str(info.value) for s in ("long.png", f"{wh[0]}x{wh[1]}", ratio, "limit of 10:1"))


def test_image_at_the_aspect_limit_is_resized_like_torchvision():
    img = decode_image(encode(_smooth_image(640, 64), "PNG"))  # exactly 10:1
    diff = np.abs(np.asarray(resize_center_crop(img, 48)).astype(np.int16) - _torchvision(img, 48))
    assert diff.max() <= 1 and diff.mean() <= 0.05


# Run in a fresh interpreter: ru_maxrss is the process's peak resident memory, so each step's growth over
# the baseline after imports is what that step needed at most.
_MEMORY_PROBE = """
import resource, sys
from featmap_ray.io.imageio import ImageDecodeError, decode_image, resize_center_crop
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
files = [open(p, "rb").read() for p in sys.argv[1:]]
base = peak()
for data in files[:2]:
    try:
        decode_image(data)
        sys.exit("an elongated image was decoded")
    except ImageDecodeError as e:
        assert e.reason == "aspect_ratio", e.reason
refused = peak() - base
out = resize_center_crop(decode_image(files[2]), 288)
assert out.size == (288, 288)
at_limit = peak() - base
out = resize_center_crop(decode_image(files[0], max_aspect=float("inf")), 288)
assert out.size == (288, 288)
print(refused, at_limit, peak() - base, base)
"""


def test_hostile_images_take_little_memory(tmp_path):  # ru_maxrss in KiB: Linux, where the project runs
    paths = []
    for name, data in [("a.png", blank_png(32, 100_000)), ("b.png", blank_png(8, 3_000_000)),
                       ("c.png", blank_png(3200, 320))]:  # c: 10:1, allowed
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    run = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, *paths], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    refused, at_limit, resized, _ = (float(x) for x in run.stdout.split())
    # Growth of the peak over the one after imports (about 30 MB; memory freed by imports is reused, so small
    # steps show as 0). Refusals decode nothing; the 10:1 image (1 M pixels, 4 MB as RGB) and the 32x100,000
    # one (3.2 M pixels, 13 MB) cost their decoded source and a crop-sized intermediate. Resizing all of the
    # 32x100,000 image, then cropping (the old way, torchvision's way), grew the peak by 1.1 GB.
    assert refused < 5 and at_limit < 30 and resized < 100, (refused, at_limit, resized)


def _no_subprocess(*args, **kwargs):
    raise AssertionError(f"a subprocess was started: {args!r}")


@pytest.mark.parametrize("name", sorted(REFUSED_FORMATS))
def test_refused_formats_run_no_plugin_and_no_subprocess(name, monkeypatch):
    monkeypatch.setattr(subprocess, "Popen", _no_subprocess)  # Pillow's EPS loader runs Ghostscript this way
    data = refused_format_files()[name]
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, source=name)
    fmt = REFUSED_FORMATS[name]
    assert info.value.reason == "format_not_allowed"
    assert str(info.value) == f"{name}: {fmt} images are not accepted here (accepted: PNG, JPEG, WEBP, BMP, TIFF, GIF)"
    with Image.open(io.BytesIO(data)) as img:  # Pillow itself knows the format (and opens it without a subprocess)
        assert img.format == fmt


def test_a_narrower_format_list_refuses_the_rest():
    bmp = encode(_smooth_image(64, 48), "BMP")
    assert decode_image(bmp).size == (64, 48)
    with pytest.raises(ImageDecodeError) as info:
        decode_image(bmp, formats=["PNG"], source="x.bmp")
    assert info.value.reason == "format_not_allowed"
    assert str(info.value) == "x.bmp: BMP images are not accepted here (accepted: PNG)"
    # Unknown to every Pillow plugin: still not_an_image.
    with pytest.raises(ImageDecodeError) as info:
        decode_image(b"plain text, not an image" * 4, formats=["PNG"])
    assert info.value.reason == "not_an_image"


# -- PNG storage --------------------------------------------------------------------


def test_png_round_trip_is_lossless():
    img = _noise_image(123, 77)
    arr = decode_png_rgb(encode_png(img))
    assert arr.dtype == np.uint8 and arr.shape == (77, 123, 3)
    assert np.array_equal(arr, np.asarray(img))
    arr[0, 0] = 0  # callers get their own, writable array


def test_png_helpers_refuse_the_wrong_input():
    with pytest.raises(ValueError, match="RGB"):
        encode_png(Image.new("RGBA", (4, 4)))
    with pytest.raises(ValueError, match="PNG"):
        decode_png_rgb(encode(_noise_image(8, 8), "JPEG"))
