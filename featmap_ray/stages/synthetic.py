"""Feature tables with a known ground truth, written through the store like `extract` writes them.

Originals are random (C, H, W) maps; each manipulation's maps are a known function of them (an
affine map A x + b per position, an exact rotation), so a mapping run must recover that function.
Used by the tests and benchmarks, and useful to check a deployment end to end without images.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from featmap_ray.io import tables

BACKBONE, LAYER = "convnext_base", "stage3"
FAMILIES = {tables.ORIGINAL: "original", "rotation_90": "geometric", "hue_shift_60": "photometric"}


def affine_truth(channels: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = np.eye(channels) + 0.3 * rng.standard_normal((channels, channels))
    return a.astype(np.float32), rng.standard_normal(channels).astype(np.float32)


def apply_affine(x: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("oc,nchw->nohw", a, x) + b[None, :, None, None]


def affine_manipulation(channels: int, seed: int = 1):
    a, b = affine_truth(channels, seed)
    return lambda x: apply_affine(x, a, b)


def read_pairs(root: str, manipulation: str, split: str = "train", dataset: str = "t"):
    """(x, y) tensors of the stored pairs, in source_id order, loaded into memory."""
    import torch

    from featmap_ray.stages import pairs as data

    st = tables.Store(root)
    pairs = data.load_pairs(st, dataset=dataset, backbone=BACKBONE, layer=LAYER, manipulation=manipulation, split=split)
    x, y = pairs.read(np.arange(len(pairs)))
    return torch.from_numpy(x.copy()), torch.from_numpy(y.copy())  # Arrow buffers are read-only


def write_tables(root: str, *, dataset: str = "t", n_train: int = 48, n_test: int = 16, shape=(8, 3, 3),
                 manipulations: dict | None = None, seed: int = 0, dtype: str = "float32",
                 nan_key: tuple[str, str] | None = None) -> dict[str, np.ndarray]:
    """Images rows (no pixels) and a features table for (BACKBONE, LAYER); returns the originals."""
    rng = np.random.default_rng(seed)
    manipulations = manipulations or {"hue_shift_60": affine_manipulation(shape[0]),
                                      "rotation_90": lambda x: np.rot90(x, 1, axes=(2, 3))}
    st = tables.Store(root)
    n = n_train + n_test
    ids = [f"{dataset}{i:04d}" for i in range(n)]
    splits = ["train"] * n_train + ["test"] * n_test
    classes = (np.arange(n) % 3).astype(np.int32)
    x = (2.0 + 1.5 * rng.standard_normal((n, *shape))).astype(np.float32)
    variants = {tables.ORIGINAL: x, **{m: fn(x).astype(np.float32) for m, fn in manipulations.items()}}
    if nan_key is not None:  # (source_id, variant) whose stored map gets a NaN
        variants[nan_key[1]][ids.index(nan_key[0]), 0, 0, 0] = np.nan

    image_rows = [{"source_id": s, "variant": v, "dataset": dataset, "split": sp, "class_idx": int(c),
                   "class_name": f"c{c}", "family": FAMILIES.get(v, "photometric"), "params": "{}",
                   "seed": None, "image": b"", "width": 0, "height": 0, "source_path": ""}
                  for v in variants for s, sp, c in zip(ids, splits, classes, strict=True)]
    tables.ensure_table(st.layout.images, tables.IMAGES_SCHEMA)
    tables.commit_new_rows(st.layout.images, pa.Table.from_pylist(image_rows, schema=tables.IMAGES_SCHEMA))

    schema = tables.feature_schema(shape, dtype, {"backbone": BACKBONE, "layer": LAYER})
    tables.ensure_table(st.layout.features(BACKBONE, LAYER), schema)
    for v, maps in variants.items():
        table = pa.table({"source_id": ids, "variant": [v] * n, "split": splits, "class_idx": classes,
                          "feature": tables.tensor_array(maps.astype(dtype))}).cast(schema)
        tables.commit_new_rows(st.layout.features(BACKBONE, LAYER), table)
    return variants
