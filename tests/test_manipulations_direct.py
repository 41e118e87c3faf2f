"""Tests for featmap_ray.manipulations.direct against independent numpy definitions."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from featmap_ray.manipulations.direct import (
    OPS,
    PAPER_MASKS,
    Manipulation,
    expand,
    register,
)
from featmap_ray.seeding import derive_seed

SIZE = 288


def _only(config: dict) -> Manipulation:
    (variant,) = expand(config)
    return variant


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(np.int32)


@pytest.fixture
def random_img() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def _solid(value: int) -> Image.Image:
    return Image.new("RGB", (SIZE, SIZE), (value, value, value))


# --- geometric ----------------------------------------------------------------


@pytest.mark.parametrize("degrees,k", [(90, 1), (180, 2), (270, 3)])
def test_rotation_is_counter_clockwise_rot90(random_img, degrees, k):
    out = _only({"rotation": [degrees]}).apply(random_img)
    np.testing.assert_array_equal(np.asarray(out), np.rot90(np.asarray(random_img), k=k))


def test_rotation_off_axis_fills_corners_black():
    out = np.asarray(_only({"rotation": [45]}).apply(_solid(255)))
    assert out.shape == (SIZE, SIZE, 3)
    for y, x in [(0, 0), (0, SIZE - 1), (SIZE - 1, 0), (SIZE - 1, SIZE - 1)]:
        assert out[y, x].tolist() == [0, 0, 0]
    assert out[SIZE // 2, SIZE // 2].tolist() == [255, 255, 255]


@pytest.mark.parametrize("axis,flip", [("h", lambda a: a[:, ::-1]), ("v", lambda a: a[::-1])])
def test_mirror(random_img, axis, flip):
    out = _only({"mirror": [axis]}).apply(random_img)
    np.testing.assert_array_equal(np.asarray(out), flip(np.asarray(random_img)))


def test_mirror_direct_bad_axis_raises(random_img):
    bad = Manipulation("mirror_x", "mirror", "geometric", "x", False)
    with pytest.raises(ValueError, match="mirror"):
        bad.apply(random_img)


def test_translation_moves_content_left_and_up(random_img):
    out = _arr(_only({"translation": [[10, 5]]}).apply(random_img))
    src = _arr(random_img)
    expected = np.zeros_like(src)
    expected[: SIZE - 5, : SIZE - 10] = src[5:, 10:]
    np.testing.assert_array_equal(out, expected)


def test_perspective_identity_points_return_input(random_img):
    corners = [[0, 0], [SIZE, 0], [SIZE, SIZE], [0, SIZE]]
    out = _only({"perspective": [corners]}).apply(random_img)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(random_img))


def _homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """3x3 H with H @ [x, y, 1] ~ dst for the four src points (DLT, h33 = 1)."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    return np.append(np.linalg.solve(np.array(rows, float), np.array(rhs, float)), 1).reshape(3, 3)


def _bilinear_perspective(img: Image.Image, points: list[list[int]]) -> tuple[np.ndarray, ...]:
    """Inverse-mapped bilinear warp of the quad onto the canvas; returns (values, valid mask)."""
    corners = [[0, 0], [SIZE, 0], [SIZE, SIZE], [0, SIZE]]
    inverse = np.linalg.inv(_homography(np.array(points, float), np.array(corners, float)))
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    sx, sy, sw = np.tensordot(inverse, np.stack([x, y, np.ones_like(x)]), axes=1)
    sx, sy = sx / sw, sy / sw
    inside = (sx >= 0) & (sy >= 0) & (sx <= SIZE - 2) & (sy <= SIZE - 2)
    x0, y0 = np.floor(sx[inside]).astype(int), np.floor(sy[inside]).astype(int)
    fx, fy = (sx[inside] - x0)[:, None], (sy[inside] - y0)[:, None]
    src = np.asarray(img).astype(np.float64)
    values = (
        src[y0, x0] * (1 - fx) * (1 - fy)
        + src[y0, x0 + 1] * fx * (1 - fy)
        + src[y0 + 1, x0] * (1 - fx) * fy
        + src[y0 + 1, x0 + 1] * fx * fy
    )
    return values, inside


PERSPECTIVE_QUAD = [[20, 10], [270, 30], [280, 260], [5, 280]]


def test_perspective_matches_numpy_homography_bilinear(random_img):
    # Noise makes nearest-neighbour sampling or a wrong matrix miss by tens of levels;
    # OpenCV's 1/32-pixel fixed-point bilinear stays within one level.
    out = _arr(_only({"perspective": [PERSPECTIVE_QUAD]}).apply(random_img))
    expected, inside = _bilinear_perspective(random_img, PERSPECTIVE_QUAD)
    assert inside.mean() > 0.95
    assert np.abs(out[inside] - expected).max() <= 1.0


def test_perspective_outside_source_is_black():
    points = [[-50, -50], [SIZE + 50, -50], [SIZE + 50, SIZE + 50], [-50, SIZE + 50]]
    out = np.asarray(_only({"perspective": [points]}).apply(_solid(255)))
    assert out[:20, :20].max() == 0 and out[-20:, -20:].max() == 0
    assert out[SIZE // 2, SIZE // 2].max() > 0


# --- mask ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "mask,side", zip(PAPER_MASKS, [78, 91, 104, 39]), ids=[m["name"] for m in PAPER_MASKS]
)
def test_paper_mask_paints_inclusive_square(random_img, mask, side):
    (x0, y0), _, (x1, y1), _ = mask["points"]
    assert x1 - x0 + 1 == side and y1 - y0 + 1 == side
    out = _arr(_only({"mask": [mask]}).apply(random_img))
    expected = _arr(random_img).copy()
    expected[y0 : y1 + 1, x0 : x1 + 1] = mask["color"]
    np.testing.assert_array_equal(out, expected)


# --- photometric --------------------------------------------------------------


def _hsv_shift_reference(img: Image.Image, shift: int) -> np.ndarray:
    hsv = np.asarray(img.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int64) + shift) % 256
    return np.asarray(Image.frombytes("HSV", img.size, hsv.tobytes()).convert("RGB"))


@pytest.mark.parametrize("shift", [60, 200, -30])
def test_hue_shift_matches_numpy_hsv(random_img, shift):
    out = _only({"hue_shift": [shift]}).apply(random_img)
    np.testing.assert_array_equal(np.asarray(out), _hsv_shift_reference(random_img, shift))


def test_hue_shift_full_turn_is_hsv_round_trip(random_img):
    out = _only({"hue_shift": [256]}).apply(random_img)
    round_trip = np.asarray(random_img.convert("HSV").convert("RGB"))
    np.testing.assert_array_equal(np.asarray(out), round_trip)


def test_grayscale_is_601_luma_on_three_channels(random_img):
    out = _arr(_only({"grayscale": True}).apply(random_img))
    rgb = _arr(random_img)
    luma = np.rint((rgb[..., 0] * 299 + rgb[..., 1] * 587 + rgb[..., 2] * 114) / 1000)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert np.abs(out[..., 0] - luma).max() <= 1
    np.testing.assert_array_equal(out[..., 0], np.asarray(random_img.convert("L")))


@pytest.mark.parametrize("delta", [20, -20, -100, 150])
def test_brightness_scales_towards_black(random_img, delta):
    out = _arr(_only({"brightness": [delta]}).apply(random_img))
    expected = np.clip(_arr(random_img) * (1 + delta / 100), 0, 255)
    assert np.abs(out - expected).max() <= 1


@pytest.mark.parametrize("delta", [20, -20, -100, 150])
def test_contrast_blends_with_mean_luminance_grey(random_img, delta):
    out = _arr(_only({"contrast": [delta]}).apply(random_img))
    rgb = _arr(random_img)
    mean = np.floor((rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114).mean() + 0.5)
    factor = 1 + delta / 100
    expected = np.clip(mean + factor * (rgb - mean), 0, 255)
    assert np.abs(out - expected).max() <= 1


# --- noise --------------------------------------------------------------------


def _noise_reference(value: int, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, sigma, (SIZE, SIZE, 3)).astype(np.int16)
    return np.clip(np.int16(value) + noise, 0, 255).astype(np.uint8)


def test_noise_statistics_and_exact_truncation():
    noise = _only({"noise": [40]})
    out = np.asarray(noise.apply(_solid(128), np.random.default_rng(7)))
    diff = out.astype(np.float64) - 128
    # n = 248832 draws: the sample mean's standard error is 40/sqrt(n) ~ 0.08;
    # truncation toward zero and rare clipping pull the std a little under 40.
    assert abs(diff.mean()) < 0.5
    assert 38.5 < diff.std() < 40.5
    np.testing.assert_array_equal(out, _noise_reference(128, 40, 7))
    rounded = np.clip(128 + np.rint(np.random.default_rng(7).normal(0, 40, out.shape)), 0, 255)
    assert (out != rounded).any()  # truncation, not rounding


@pytest.mark.parametrize("value", [0, 255])
def test_noise_clips_at_range_ends(value):
    out = np.asarray(_only({"noise": [40]}).apply(_solid(value), np.random.default_rng(3)))
    np.testing.assert_array_equal(out, _noise_reference(value, 40, 3))
    # About half the draws push past the end and must be clipped onto it.
    assert 0.4 < (out == value).mean() < 0.6


def test_noise_seeding():
    noise, img = _only({"noise": [40]}), _solid(128)
    a = np.asarray(noise.apply(img, np.random.default_rng(1)))
    b = np.asarray(noise.apply(img, np.random.default_rng(1)))
    c = np.asarray(noise.apply(img, np.random.default_rng(2)))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_noise_needs_rng():
    with pytest.raises(ValueError, match="rng"):
        _only({"noise": [40]}).apply(_solid(128))


# --- contract -----------------------------------------------------------------

PAPER_CONFIG = {
    "rotation": [90, 180, 270],
    "mirror": ["h", "v"],
    "noise": [40],
    "mask": PAPER_MASKS,
    "hue_shift": [60],
    "grayscale": True,
    "brightness": [],
    "contrast": [],
    "translation": [[10, 0]],
    "perspective": [],
}


def test_expand_paper_config_names_and_order():
    variants = expand(PAPER_CONFIG)
    assert [v.name for v in variants] == [
        "rotation_90",
        "rotation_180",
        "rotation_270",
        "mirror_h",
        "mirror_v",
        "noise_40",
        "mask_top_left_square",
        "mask_bottom_right_square",
        "mask_big_square_center",
        "mask_small_square_center",
        "hue_shift_60",
        "grayscale",
        "translation_10_0",
    ]
    assert [v.random for v in variants] == [v.name == "noise_40" for v in variants]
    assert {v.op: v.family for v in variants} == {
        "rotation": "geometric",
        "mirror": "geometric",
        "noise": "photometric",
        "mask": "mask",
        "hue_shift": "photometric",
        "grayscale": "photometric",
        "translation": "geometric",
    }


def test_expand_other_names():
    config = {
        "brightness": [20, -20],
        "contrast": [20],
        "perspective": [
            [[0, 0], [288, 0], [288, 288], [0, 288]],
            [[5, 5], [280, 0], [288, 288], [0, 280]],
        ],
        "grayscale": False,
    }
    assert [v.name for v in expand(config)] == [
        "brightness_20",
        "brightness_-20",
        "contrast_20",
        "perspective_0",
        "perspective_1",
    ]


def test_params_json_and_private_param_copy():
    (mask,) = expand({"mask": [PAPER_MASKS[0]]})
    assert json.loads(mask.params_json()) == {"op": "mask", "param": PAPER_MASKS[0]}
    assert mask.param is not PAPER_MASKS[0]
    translation = _only({"translation": [(10, 0)]})
    assert translation.params_json() == '{"op": "translation", "param": [10, 0]}'


def test_expand_unknown_op_names_key_and_known_ops():
    with pytest.raises(ValueError, match=r"'blur'.*rotation"):
        expand({"blur": [3]})


@pytest.mark.parametrize(
    "op,param",
    [
        ("mirror", "x"),
        ("hue_shift", 0.5),
        ("hue_shift", "60"),
        ("mask", {"name": "m", "points": [[0, 0], [5, 0], [5, 5]], "color": [1, 2]}),
        ("mask", {"name": "m", "points": [[0, 0], [5, 0]], "color": [1, 2, 3]}),
        ("mask", {"points": [[0, 0], [5, 0], [5, 5]], "color": [1, 2, 3]}),
        ("perspective", [[0, 0], [1, 0], [1, 1]]),
        ("perspective", [[0, 0], [1, 0], [1, 1], [0]]),
        ("noise", -1),
        ("rotation", "90"),
        ("rotation", True),
        ("translation", [10]),
        ("brightness", -150),
        ("grayscale", 1),
    ],
)
def test_expand_bad_param_names_op_and_value(op, param):
    with pytest.raises(ValueError, match=op) as info:
        expand({"rotation": [90], op: [param]})
    assert repr(param) in str(info.value)


def test_expand_bad_value_shape_and_duplicates():
    with pytest.raises(ValueError, match="noise"):
        expand({"noise": 40})
    with pytest.raises(ValueError, match="duplicate.*rotation_90"):
        expand({"rotation": [90, 90]})


def test_apply_rejects_non_rgb(random_img):
    with pytest.raises(ValueError, match="RGB"):
        _only({"rotation": [90]}).apply(random_img.convert("L"))


@pytest.mark.parametrize("variant", expand(PAPER_CONFIG), ids=lambda v: v.name)
def test_every_variant_keeps_rgb_and_size(variant):
    img = Image.new("RGB", (SIZE, SIZE // 2), (10, 20, 30))
    out = variant.apply(img, np.random.default_rng(0))
    assert out.mode == "RGB" and out.size == img.size


def test_register_adds_an_op():
    @register("invert_test", "photometric")
    def invert(img: Image.Image, _: bool) -> Image.Image:
        return Image.fromarray(255 - np.asarray(img))

    try:
        (variant,) = expand({"invert_test": [True]})
        assert variant.name == "invert_test_True" and variant.family == "photometric"
        assert np.asarray(variant.apply(_solid(10)))[0, 0].tolist() == [245, 245, 245]
        with pytest.raises(ValueError, match="already registered"):
            register("invert_test", "photometric")(invert)
    finally:
        del OPS["invert_test"]


def test_derive_seed():
    seed = derive_seed(0, "img_001", "noise_40")
    assert seed == derive_seed(0, "img_001", "noise_40")
    assert 0 <= seed < 2**63
    assert seed != derive_seed(1, "img_001", "noise_40")
    assert seed != derive_seed(0, "img_002", "noise_40")
    assert derive_seed("ab", "c") != derive_seed("a", "bc")
    assert len({derive_seed(i) for i in range(1000)}) == 1000
