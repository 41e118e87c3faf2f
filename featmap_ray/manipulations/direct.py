"""Direct image manipulations: PIL RGB -> PIL RGB functions and their registry.

Each op reproduces the reference code base's semantics exactly (PIL / OpenCV calls,
rounding and fill behaviour), so feature maps computed here are comparable with its
results. `expand` turns a config mapping (op -> configured values) into concrete,
named variants (`rotation_90`, `mask_top_left_square`, ...), validating every
param up front.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

Family = Literal["geometric", "photometric", "mask", "semantic"]

OpFn = Callable[..., Image.Image]
NameFor = Callable[[Any, int], str]
Validator = Callable[[Any], None]


@dataclass(frozen=True)
class OpSpec:
    """A registered op: `fn(img, param)` (or `fn(img, param, rng)` when `random`)."""

    fn: OpFn
    family: str
    random: bool
    name_for: NameFor
    validate: Validator


OPS: dict[str, OpSpec] = {}


def _name_part(param: Any) -> str:
    """A param as part of a variant name; a whole float as the integer it equals (90.0 -> "90"), so one
    value names one variant however the config spells it (the mapping side finds a rotation's exact
    spatial transform by its name, `rotation_90`)."""
    return str(int(param)) if isinstance(param, float) and param.is_integer() else str(param)


def register(
    name: str,
    family: Family,
    random: bool = False,
    name_for: NameFor | None = None,
    validate: Validator | None = None,
) -> Callable[[OpFn], OpFn]:
    """Decorator adding an op to `OPS`.

    `name_for(param, index)` gives the variant name (default `<name>_<param>`, see `_name_part`);
    `validate(param)` raises ValueError with a reason when the param is unusable.
    """
    if family not in get_args(Family):
        raise ValueError(f"op {name!r}: unknown family {family!r}")

    def decorator(fn: OpFn) -> OpFn:
        if name in OPS:
            raise ValueError(f"op {name!r} is already registered")
        OPS[name] = OpSpec(
            fn=fn,
            family=family,
            random=random,
            name_for=name_for or (lambda param, index: f"{name}_{_name_part(param)}"),
            validate=validate or (lambda param: None),
        )
        return fn

    return decorator


@dataclass(frozen=True)
class Manipulation:
    """One concrete variant of an op, e.g. `rotation_90`."""

    name: str
    op: str
    family: str
    param: Any
    random: bool

    def apply(self, img: Image.Image, rng: np.random.Generator | None = None) -> Image.Image:
        """Apply to an RGB image; random ops need `rng` (never the global RNG)."""
        if img.mode != "RGB":
            raise ValueError(f"{self.name}: expected an RGB image, got mode {img.mode!r}")
        fn = OPS[self.op].fn
        if self.random:
            if rng is None:
                raise ValueError(f"{self.name}: random op needs a numpy Generator (rng)")
            out = fn(img, self.param, rng)
        else:
            out = fn(img, self.param)
        # Guards the contract for every registered op, including ones added later.
        if out.mode != "RGB" or out.size != img.size:
            raise RuntimeError(
                f"{self.name}: op returned mode {out.mode!r} size {out.size}, "
                f"expected RGB {img.size}"
            )
        return out

    def params_json(self) -> str:
        return json.dumps({"op": self.op, "param": self.param}, sort_keys=True)


def expand(config: Mapping[str, Any]) -> list[Manipulation]:
    """Concrete variants for `config`, in mapping order then list order.

    A value is a list of params, or a bool (`True` -> one variant with param True,
    `False` -> none). Raises ValueError for unknown ops, bad params or duplicate names.
    """
    variants: list[Manipulation] = []
    seen: set[str] = set()
    for op, values in config.items():
        if op not in OPS:
            raise ValueError(f"unknown manipulation op {op!r}; known ops: {', '.join(sorted(OPS))}")
        spec = OPS[op]
        if isinstance(values, bool):
            params = [True] if values else []
        elif isinstance(values, (list, tuple)):
            params = list(values)
        else:
            raise ValueError(f"{op}: expected a list of params or a bool, got {values!r}")
        for index, param in enumerate(params):
            try:
                spec.validate(param)
                # JSON round trip: a plain, private copy (tuples -> lists, shared
                # config dicts such as PAPER_MASKS cannot be mutated through it).
                param = json.loads(json.dumps(param))
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{op}: invalid param {param!r}: {exc}") from exc
            name = spec.name_for(param, index)
            if name in seen:
                raise ValueError(f"{op}: duplicate variant name {name!r}")
            seen.add(name)
            variants.append(Manipulation(name, op, spec.family, param, spec.random))
    return variants


# --- param validators ---------------------------------------------------------


def _is_number(value: Any) -> bool:
    # bool is an int subclass, but True as an angle or a sigma is a config mistake.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_number(value: Any) -> None:
    if not _is_number(value):
        raise ValueError("expected a finite number")


def _check_percent(value: Any) -> None:
    _check_number(value)
    if value < -100:
        raise ValueError("delta below -100% gives a negative enhancement factor")


def _check_points(value: Any, count: int | None = None, minimum: int = 0) -> None:
    if not isinstance(value, (list, tuple)):
        raise ValueError("points must be a list of [x, y]")
    if count is not None and len(value) != count:
        raise ValueError(f"expected exactly {count} points, got {len(value)}")
    if len(value) < minimum:
        raise ValueError(f"expected at least {minimum} points, got {len(value)}")
    for point in value:
        is_pair = isinstance(point, (list, tuple)) and len(point) == 2
        if not (is_pair and all(map(_is_number, point))):
            raise ValueError(f"point {point!r} is not [x, y]")


def _check_mirror(value: Any) -> None:
    if value not in ("h", "v"):
        raise ValueError("expected 'h' or 'v'")


def _check_sigma(value: Any) -> None:
    _check_number(value)
    if value < 0:
        raise ValueError("sigma must be >= 0")


def _check_mask(value: Any) -> None:
    if not isinstance(value, Mapping):
        raise ValueError("expected a dict {name, points, color}")
    name = value.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("mask needs a non-empty string name")
    _check_points(value.get("points"), minimum=3)
    color = value.get("color")
    if not (
        isinstance(color, (list, tuple))
        and len(color) == 3
        and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in color)
    ):
        raise ValueError("color must be 3 integers in [0, 255]")


def _check_hue(value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError("hue shift must be an integer (1/256 of a turn)")


def _check_grayscale(value: Any) -> None:
    if value is not True:
        raise ValueError("grayscale param must be True")


def _check_translation(value: Any) -> None:
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(map(_is_number, value))):
        raise ValueError("expected [tx, ty]")


def _check_perspective(value: Any) -> None:
    _check_points(value, count=4)


# --- ops ----------------------------------------------------------------------


@register("rotation", "geometric", validate=_check_number)
def rotate(img: Image.Image, degrees: float) -> Image.Image:
    """Counter-clockwise, same canvas, NEAREST, black corners (PIL defaults)."""
    return img.rotate(degrees)


@register("mirror", "geometric", validate=_check_mirror)
def mirror(img: Image.Image, axis: str) -> Image.Image:
    """'h' swaps left and right, 'v' swaps top and bottom."""
    if axis == "h":
        return ImageOps.mirror(img)
    if axis == "v":
        return ImageOps.flip(img)
    raise ValueError(f"mirror: axis must be 'h' or 'v', got {axis!r}")


@register("noise", "photometric", random=True, validate=_check_sigma)
def gaussian_noise(img: Image.Image, sigma: float, rng: np.random.Generator) -> Image.Image:
    """Adds N(0, sigma^2) per pixel and channel (0-255 scale), truncated to int16."""
    arr = np.asarray(img, dtype=np.int16)
    noise = rng.normal(0.0, sigma, arr.shape).astype(np.int16)
    return Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8))


@register(
    "mask", "mask", name_for=lambda param, index: f"mask_{param['name']}", validate=_check_mask
)
def polygon_mask(img: Image.Image, mask: Mapping[str, Any]) -> Image.Image:
    """Paints the filled polygon (outline included) in the mask's colour."""
    stencil = Image.new("L", img.size, 0)
    points = [tuple(p) for p in mask["points"]]
    ImageDraw.Draw(stencil).polygon(points, fill=255, outline=255)
    out = img.copy()
    out.paste(tuple(mask["color"]), mask=stencil)
    return out


@register("hue_shift", "photometric", validate=_check_hue)
def hue_shift(img: Image.Image, shift: int) -> Image.Image:
    """Rotates PIL's 8-bit HSV hue by `shift`/256 of a turn."""
    h, s, v = img.convert("HSV").split()
    h = h.point([(i + shift) % 256 for i in range(256)])
    return Image.merge("HSV", (h, s, v)).convert("RGB")


@register(
    "grayscale", "photometric", name_for=lambda param, index: "grayscale", validate=_check_grayscale
)
def grayscale(img: Image.Image, _: bool) -> Image.Image:
    """ITU-R 601-2 luma, replicated to three channels."""
    return img.convert("L").convert("RGB")


@register("brightness", "photometric", validate=_check_percent)
def brightness(img: Image.Image, delta: float) -> Image.Image:
    """Brightness factor 1 + delta/100 (blend with black)."""
    return ImageEnhance.Brightness(img).enhance(1 + delta / 100)


@register("contrast", "photometric", validate=_check_percent)
def contrast(img: Image.Image, delta: float) -> Image.Image:
    """Contrast factor 1 + delta/100 (blend with the mean-luminance grey)."""
    return ImageEnhance.Contrast(img).enhance(1 + delta / 100)


@register(
    "translation",
    "geometric",
    name_for=lambda param, index: f"translation_{param[0]}_{param[1]}",
    validate=_check_translation,
)
def translate(img: Image.Image, offset: list[float]) -> Image.Image:
    """Output (x, y) reads input (x + tx, y + ty): content moves left/up, black fill."""
    tx, ty = offset
    return img.transform(
        img.size,
        Image.Transform.AFFINE,
        (1, 0, tx, 0, 1, ty),
        resample=Image.Resampling.NEAREST,
        fillcolor=(0, 0, 0),
    )


@register(
    "perspective",
    "geometric",
    name_for=lambda param, index: f"perspective_{index}",
    validate=_check_perspective,
)
def perspective(img: Image.Image, points: list[list[float]]) -> Image.Image:
    """Warps the quadrilateral `points` (TL, TR, BR, BL) onto the full canvas."""
    import cv2  # lazy: OpenCV is heavy and only this op needs it

    width, height = img.size
    src = np.asarray(points, dtype=np.float32)
    dst = np.asarray([(0, 0), (width, 0), (width, height), (0, height)], dtype=np.float32)
    matrix = cv2.getPerspectiveTransform(src, dst)
    out = cv2.warpPerspective(
        np.asarray(img),
        matrix,
        (width, height),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    return Image.fromarray(out)


# The four masks from the paper, as inclusive pixel squares on a 288x288 image.
PAPER_MASKS: list[dict[str, Any]] = [
    {
        "name": "top_left_square",
        "points": [[26, 26], [103, 26], [103, 103], [26, 103]],
        "color": [255, 0, 0],
    },
    {
        "name": "bottom_right_square",
        "points": [[180, 180], [270, 180], [270, 270], [180, 270]],
        "color": [0, 255, 0],
    },
    {
        "name": "big_square_center",
        "points": [[90, 90], [193, 90], [193, 193], [90, 193]],
        "color": [0, 0, 255],
    },
    {
        "name": "small_square_center",
        "points": [[116, 116], [154, 116], [154, 154], [116, 154]],
        "color": [255, 255, 0],
    },
]
