"""The embedded demo's dataset: real photographs bundled with scikit-image, written as a FeatMap layout.

Each photo goes to `train`; photos of at least 400 px also give their four quadrants as further
images (three to `train`, one to `test`), smaller ones a centre crop to `test`. Nothing is
downloaded: every file comes from scikit-image's own package data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from featmap_ray.io.files import Location

# class -> photo files inside the scikit-image package (skimage/data/)
PHOTOS = {
    "animal": ["chelsea.png"],
    "person": ["astronaut.png", "camera.png"],
    "vehicle": ["rocket.jpg", "motorcycle_left.png"],
    "food": ["coffee.png"],
    "space": ["hubble_deep_field.jpg", "moon.png"],
    "microscopy": ["ihc.png", "retina.jpg"],
    "texture": ["brick.png", "grass.png", "gravel.png"],
}


def _views(arr: np.ndarray) -> list[tuple[str, str, np.ndarray]]:
    h, w = arr.shape[:2]
    views = [("train", "full", arr)]
    if min(h, w) >= 400:
        quads = [arr[: h // 2, : w // 2], arr[: h // 2, w // 2:], arr[h // 2:, : w // 2], arr[h // 2:, w // 2:]]
        views += [("test" if i == 3 else "train", f"q{i}", q) for i, q in enumerate(quads)]
    else:
        views.append(("test", "centre", arr[h // 10: h - h // 10, w // 10: w - w // 10]))
    return views


def materialize(root: str) -> str:
    """Write the photos under `root`, a local folder or an object-store URI (once; existing files
    are kept), and return `root`."""
    import io

    import skimage.data

    base = Location(root)
    package_data = Path(skimage.data.__file__).parent
    for cls, files in PHOTOS.items():
        for file in files:
            name = Path(file).stem
            if (base / "images" / "train" / cls / f"{name}_full.png").exists():
                continue
            photo = np.asarray(Image.open(package_data / file))
            for split, view, pixels in _views(photo):
                png = io.BytesIO()
                Image.fromarray(np.ascontiguousarray(pixels)).save(png, format="PNG")
                (base / "images" / split / cls / f"{name}_{view}.png").write_bytes(png.getvalue())
    return root
