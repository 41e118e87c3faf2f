"""What a request may carry, decoded safely: images (as ingest decodes them) and feature maps (no pickle).

Every failure is a `RequestError` with an HTTP status and a message that says what is wrong; the
ingress turns it into a JSON answer and keeps serving.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math

import numpy as np
from PIL import Image

from featmap_ray.config import ServeLimits
from featmap_ray.io import imageio

NPY_MAGIC = b"\x93NUMPY"


class RequestError(Exception):
    """A request the service cannot serve: `status` (4xx, or 503 when a retry may succeed) and a message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def from_base64(text: str, what: str) -> bytes:
    """Standard base64, optionally as a data URL (`data:image/png;base64,...`)."""
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"{what}: not valid base64") from None


def from_json(body: bytes, key: str) -> bytes:
    """The file in a JSON body {key: "<base64 or data URL>"}."""
    try:
        payload = json.loads(body)
    except ValueError:
        raise RequestError(400, "JSON body: not valid JSON") from None
    if not isinstance(payload, dict) or not isinstance(payload.get(key), str):
        raise RequestError(400, f"JSON body: expected {{\"{key}\": \"<base64>\"}}")
    return from_base64(payload[key], key)


def to_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png(pixels: np.ndarray) -> bytes:
    """Lossless PNG of uint8 (H, W, 3) pixels."""
    return imageio.encode_png(Image.fromarray(pixels))


# How each way an upload can fail maps to HTTP: too many pixels is a body too large, a format outside
# serve.limits.formats an unsupported media type; anything else about the file is a bad request.
DECODE_STATUS = {"decompression_bomb": 413, "format_not_allowed": 415}


def image_view(data: bytes, limits: ServeLimits, size: int) -> np.ndarray:
    """An uploaded image as `extract` feeds the backbone: decoded as ingest decodes files (format, pixel count
    and aspect ratio checked from the header before any pixel is decoded), upright RGB, resized (shorter
    side) and centre-cropped: uint8 (size, size, 3)."""
    try:
        image = imageio.decode_image(data, max_pixels=limits.max_pixels, min_side=limits.min_side,
                                     max_aspect=limits.max_aspect, formats=limits.formats, source="uploaded image")
    except imageio.ImageDecodeError as e:
        raise RequestError(DECODE_STATUS.get(e.reason, 400), f"{e} ({e.reason})") from None
    return np.asarray(imageio.resize_center_crop(image, size))


def read_feature_map(data: bytes) -> np.ndarray:
    """One feature map from `.npy` (loaded without pickle) or `.safetensors` (one tensor, or one named
    `features`), as float32 (C, H, W) or (1, C, H, W); its shape and values are checked against the
    model later."""
    if data.startswith(NPY_MAGIC):
        _check_npy_header(data)
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError as e:  # object arrays (pickle), truncated data, bad header
            raise RequestError(400, f"feature map (.npy): cannot load without pickle ({e})") from None
    else:
        array = _read_safetensors(data)
    if array.dtype.kind not in "fiu":
        raise RequestError(400, f"feature map: expected real numbers, got dtype {array.dtype}")
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise RequestError(422, f"feature map: expected one map of shape (C, H, W) or (1, C, H, W), "
                                f"got shape {tuple(array.shape)}")
    return np.ascontiguousarray(array, dtype=np.float32)


def _check_npy_header(data: bytes) -> None:
    """Refuse a .npy whose header does not describe exactly the bytes that follow it, before numpy allocates
    the array its header claims (a few bytes can claim terabytes)."""
    buf = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buf)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f"unsupported .npy version {version}")
        shape, _, dtype = read_header(buf)
    except ValueError as e:
        raise RequestError(400, f"feature map (.npy): bad header ({e})") from None
    if dtype.hasobject:
        raise RequestError(400, "feature map (.npy): object arrays cannot be loaded without pickle")
    claimed, held = math.prod(shape) * dtype.itemsize, len(data) - buf.tell()
    if claimed != held:
        raise RequestError(400, f"feature map (.npy): its header claims shape {tuple(shape)} of {dtype} "
                                f"({claimed} bytes), the file holds {held}")


def _read_safetensors(data: bytes) -> np.ndarray:
    from safetensors import SafetensorError
    from safetensors.numpy import load

    # 8 little-endian bytes of header length, then a JSON header: refuse anything else before parsing.
    if len(data) < 10 or data[8:9] != b"{":
        raise RequestError(400, "feature map: neither a .npy file nor a .safetensors file")
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, TypeError, KeyError) as e:  # bad header, bf16 (no numpy type), ...
        raise RequestError(400, f"feature map (.safetensors): cannot read ({e})") from None
    if "features" in tensors:
        return tensors["features"]
    if len(tensors) != 1:
        raise RequestError(422, f"feature map (.safetensors): expected one tensor or one named 'features', "
                                f"got {sorted(tensors)}")
    return next(iter(tensors.values()))
