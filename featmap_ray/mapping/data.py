"""Training pairs and normalisation statistics, read from the features tables.

A pair is (original feature map, manipulated feature map) of one source image. Pairs are a
join of the `original` row and the variant row on `source_id`, computed as an index of row
offsets (a few bytes per pair); the tensors are read from Lance by offset only when a batch is
needed, so nothing is copied on disk.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from featmap_ray import store

INDEX_SCHEMA = pa.schema([("row", pa.int64()), ("x_offset", pa.int64()), ("y_offset", pa.int64())])


@dataclass
class Pairs:
    """The pairs of one (dataset, backbone, layer, manipulation, split), as table offsets."""

    uri: str
    source_ids: list[str]
    class_idx: np.ndarray
    x_offsets: np.ndarray  # offsets of the originals' rows in the features table
    y_offsets: np.ndarray  # offsets of the manipulated rows
    shape: tuple[int, int, int]
    itemsize: int  # bytes per stored value (2 for float16 tables)

    def __len__(self) -> int:
        return len(self.source_ids)

    def subset(self, rows: np.ndarray) -> Pairs:
        rows = np.asarray(rows, dtype=np.int64)
        return Pairs(self.uri, [self.source_ids[i] for i in rows], self.class_idx[rows], self.x_offsets[rows],
                     self.y_offsets[rows], self.shape, self.itemsize)

    def index_table(self) -> pa.Table:
        return pa.table({"row": np.arange(len(self), dtype=np.int64), "x_offset": self.x_offsets,
                         "y_offset": self.y_offsets}, schema=INDEX_SCHEMA)


def dataset_source_ids(st: store.Store, dataset: str) -> set[str]:
    table = st.open(st.images_uri)
    if table is None:
        raise FileNotFoundError(f"no images table at {st.images_uri}: run `featmap ingest` first")
    rows = table.to_table(columns=["source_id"], filter=f"variant = '{store.ORIGINAL}' AND dataset = '{dataset}'")
    return set(rows["source_id"].to_pylist())


def load_pairs(st: store.Store, *, dataset: str, backbone: str, layer: str, manipulation: str, split: str) -> Pairs:
    """Every (original, `manipulation`) pair of `dataset` in `split`, sorted by source_id."""
    uri = st.features_uri(backbone, layer)
    table = st.open(uri)
    if table is None:
        raise FileNotFoundError(f"no features table for backbone {backbone!r} layer {layer!r} at {uri}: "
                                f"run `featmap extract` with that backbone and layer first")
    # A plain scan returns rows in table order, so the position of a row is its offset for take().
    keys = table.to_table(columns=["source_id", "variant", "split", "class_idx"]).to_pandas()
    keys["offset"] = np.arange(len(keys), dtype=np.int64)
    keys = keys[keys["source_id"].isin(dataset_source_ids(st, dataset)) & (keys["split"] == split)]
    originals = keys[keys["variant"] == store.ORIGINAL].set_index("source_id")
    variants = keys[keys["variant"] == manipulation].set_index("source_id")
    joined = originals.join(variants[["offset"]], how="inner", rsuffix="_y").sort_index()
    feature_type = table.schema.field("feature").type
    return Pairs(uri, joined.index.tolist(), joined["class_idx"].to_numpy(np.int64),
                 joined["offset"].to_numpy(np.int64), joined["offset_y"].to_numpy(np.int64),
                 tuple(feature_type.shape), feature_type.value_type.byte_width)


def _rank(seed: int, source_id: str) -> str:
    return hashlib.sha1(f"{seed}:{source_id}".encode()).hexdigest()


def sample(pairs: Pairs, max_pairs: int | None, seed: int) -> Pairs:
    """A seeded subset that does not depend on table order (ranked by a hash of the key)."""
    if max_pairs is None or len(pairs) <= max_pairs:
        return pairs
    order = sorted(range(len(pairs)), key=lambda i: _rank(seed, pairs.source_ids[i]))
    return pairs.subset(np.sort(order[:max_pairs]))


def train_val_split(pairs: Pairs, val_fraction: float, seed: int) -> tuple[Pairs, Pairs]:
    """Seeded split by source image: ceil(fraction * n) images (at least one) go to validation."""
    if len(pairs) < 2:
        raise ValueError(f"{len(pairs)} training pair(s) in {pairs.uri}: at least 2 are needed to hold one out "
                         "for validation")
    n_val = max(1, math.ceil(val_fraction * len(pairs)))
    order = sorted(range(len(pairs)), key=lambda i: _rank(seed, pairs.source_ids[i]))
    return pairs.subset(np.sort(order[n_val:])), pairs.subset(np.sort(order[:n_val]))


def read_features(uri: str, offsets: np.ndarray) -> np.ndarray:
    """The (N, C, H, W) feature maps at these row offsets of a features table, in that order."""
    import lance

    return store.tensor_numpy(lance.dataset(uri).take(np.asarray(offsets), columns=["feature"])["feature"])


def _take_pairs(batch: pa.Table, uri: str) -> dict[str, np.ndarray]:
    return {"row": batch["row"].to_numpy(), "x": read_features(uri, batch["x_offset"].to_numpy()),
            "y": read_features(uri, batch["y_offset"].to_numpy())}


def ray_dataset(pairs: Pairs, *, materialize_budget: float = 0.25):
    """A Ray Dataset of {row, x, y} read from Lance by offset. Cached in the object store when it
    fits in `materialize_budget` of it, so epochs after the first do not re-read Lance."""
    import ray
    import ray.data

    ds = ray.data.from_arrow(pairs.index_table()).map_batches(
        _take_pairs, fn_kwargs={"uri": pairs.uri}, batch_format="pyarrow", batch_size=64)
    nbytes = 2 * len(pairs) * int(np.prod(pairs.shape)) * pairs.itemsize
    if nbytes < materialize_budget * ray.cluster_resources().get("object_store_memory", 0):
        ds = ds.materialize()
    return ds


# -- normalisation statistics ---------------------------------------------------------------------

@dataclass
class ChannelStats:
    """Per-channel mean and standard deviation over samples x H x W."""

    mean: np.ndarray  # (C,)
    std: np.ndarray  # (C,), population std + 1e-6 (never zero)
    count: int  # feature maps the statistics were computed from

    def to_json(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist(), "count": self.count}

    @classmethod
    def from_json(cls, data: dict) -> ChannelStats:
        return cls(np.asarray(data["mean"], np.float64), np.asarray(data["std"], np.float64), int(data["count"]))


def _partial_moments(batch: pa.Table) -> pa.Table:
    x = store.tensor_numpy(batch["feature"]).astype(np.float64)  # (N, C, H, W)
    if not np.isfinite(x).all():
        bad = [batch["source_id"][i].as_py() for i in np.flatnonzero(~np.isfinite(x).reshape(len(x), -1).all(1))]
        raise ValueError(f"non-finite values in the original feature maps of {bad[:5]}")
    values = x.transpose(1, 0, 2, 3).reshape(x.shape[1], -1)
    mean = values.mean(1)
    m2 = ((values - mean[:, None]) ** 2).sum(1)
    return pa.table({"n": [values.shape[1]], "mean": [mean.tolist()], "m2": [m2.tolist()], "maps": [len(x)]})


def channel_stats(st: store.Store, *, dataset: str, backbone: str, layer: str, split: str = "train") -> ChannelStats:
    """Statistics of every original feature map of `dataset` in `split`, streamed through Ray Data
    and combined with Chan's parallel update (exact, numerically stable, any number of blocks)."""
    uri = st.features_uri(backbone, layer)
    ids = sorted(dataset_source_ids(st, dataset))
    if not ids:
        raise ValueError(f"no original images of dataset {dataset!r} in {st.images_uri}")
    filt = f"variant = '{store.ORIGINAL}' AND split = '{split}' AND source_id IN ({store.sql_list(ids)})"
    parts = st.read_ray(uri, columns=["source_id", "feature"], filter=filt).map_batches(
        _partial_moments, batch_format="pyarrow", batch_size=256).take_all()
    if not parts:
        raise ValueError(f"no {split} originals of {dataset!r} in {uri}: cannot compute normalisation statistics")
    n, mean, m2, maps = 0, 0.0, 0.0, 0
    for p in parts:
        nb, mb, m2b = int(p["n"]), np.asarray(p["mean"]), np.asarray(p["m2"])
        delta = mb - mean
        total = n + nb
        mean = mean + delta * nb / total
        m2 = m2 + m2b + delta**2 * n * nb / total
        n, maps = total, maps + int(p["maps"])
    return ChannelStats(np.asarray(mean), np.sqrt(np.asarray(m2) / n) + 1e-6, maps)


def cached_channel_stats(st: store.Store, root: Path, *, dataset: str, backbone: str, layer: str) -> ChannelStats:
    """`channel_stats`, cached per (dataset, backbone, layer) and recomputed when the number of
    training originals in the table has changed."""
    path = root / "norm" / dataset / backbone / f"{layer}.json"
    ids = dataset_source_ids(st, dataset)
    uri = st.features_uri(backbone, layer)
    table = st.open(uri)
    if table is None:
        raise FileNotFoundError(f"no features table for backbone {backbone!r} layer {layer!r} at {uri}")
    current = len(set(table.to_table(columns=["source_id"], filter=f"variant = '{store.ORIGINAL}' AND split = 'train'")
                      ["source_id"].to_pylist()) & ids)
    if path.exists():
        cached = ChannelStats.from_json(json.loads(path.read_text()))
        if cached.count == current:
            return cached
    stats = channel_stats(st, dataset=dataset, backbone=backbone, layer=layer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(stats.to_json()))
    tmp.replace(path)  # atomic: a reader never sees half a file
    return stats
