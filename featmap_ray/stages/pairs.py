"""Training pairs and normalisation statistics, read from the features tables.

A pair is (original feature map, manipulated feature map) of one source image. Pairs are a
join of the `original` row and the variant row on `source_id`, computed as an index of row
offsets (a few bytes per pair); the tensors are read from Lance by offset only when a batch is
needed, so nothing is copied on disk.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from featmap_ray import seeding
from featmap_ray.io import tables
from featmap_ray.stages import base


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
    version: int  # the table version the offsets refer to (later appends do not move them)
    table_meta: str = ""  # the features table's own metadata (backbone, layer, dtype), as stored
    # The fingerprints of the features groups read (the originals and the manipulation), as that table
    # version records them (schema metadata only: stages.base's provenance rule).
    groups: dict[str, str] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.source_ids)

    def subset(self, rows: np.ndarray) -> Pairs:
        rows = np.asarray(rows, dtype=np.int64)
        return dataclasses.replace(self, source_ids=[self.source_ids[i] for i in rows], class_idx=self.class_idx[rows],
                                   x_offsets=self.x_offsets[rows], y_offsets=self.y_offsets[rows])

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(x, y): the original and manipulated maps of pairs `rows`, (N, C, H, W) as stored."""
        return (read_features(self.uri, self.x_offsets[rows], self.version),
                read_features(self.uri, self.y_offsets[rows], self.version))


def dataset_source_ids(st: tables.Store, dataset: str) -> set[str]:
    table = st.open(st.layout.images)
    if table is None:
        raise FileNotFoundError(f"no images table at {st.layout.images}: run `featmap ingest` first")
    return _dataset_source_ids(st.layout.images, table.version, dataset)


# Memoised per table version (a version never changes): planning a study reads the same key
# columns for every group of runs.
@functools.lru_cache(maxsize=16)
def _dataset_source_ids(uri: str, version: int, dataset: str) -> frozenset[str]:
    rows = _dataset(uri, version).to_table(columns=["source_id"],
                                           filter=f"variant = '{tables.ORIGINAL}' AND dataset = '{dataset}'")
    return frozenset(rows["source_id"].to_pylist())


@functools.lru_cache(maxsize=8)
def _key_frame(uri: str, version: int):
    # A plain scan returns rows in table order, so the position of a row is its offset for take().
    keys = _dataset(uri, version).to_table(columns=["source_id", "variant", "split", "class_idx"]).to_pandas()
    keys["offset"] = np.arange(len(keys), dtype=np.int64)
    return keys


def load_pairs(st: tables.Store, *, dataset: str, backbone: str, layer: str, manipulation: str, split: str) -> Pairs:
    """Every (original, `manipulation`) pair of `dataset` in `split`, sorted by source_id."""
    uri = st.layout.features(backbone, layer)
    table = st.open(uri)
    if table is None:
        raise FileNotFoundError(f"no features table for backbone {backbone!r} layer {layer!r} at {uri}: "
                                f"run `featmap extract` with that backbone and layer first")
    keys = _key_frame(uri, table.version)
    keys = keys[keys["source_id"].isin(dataset_source_ids(st, dataset)) & (keys["split"] == split)]
    originals = keys[keys["variant"] == tables.ORIGINAL].set_index("source_id")
    variants = keys[keys["variant"] == manipulation].set_index("source_id")
    joined = originals.join(variants[["offset"]], how="inner", rsuffix="_y").sort_index()
    feature_type = table.schema.field("feature").type
    recorded = tables.read_provenance(table)
    return Pairs(uri, joined.index.tolist(), joined["class_idx"].to_numpy(np.int64),
                 joined["offset"].to_numpy(np.int64), joined["offset_y"].to_numpy(np.int64),
                 tuple(feature_type.shape), feature_type.value_type.byte_width, table.version,
                 (table.schema.metadata or {}).get(b"featmap", b"").decode(),
                 {g: recorded.get(g, {}).get("fingerprint", "") for g in (tables.ORIGINAL, manipulation)})


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


def read_features(uri: str, offsets: np.ndarray, version: int) -> np.ndarray:
    """The (N, C, H, W) feature maps at these row offsets of version `version` of a features
    table, in that order."""
    return tables.tensor_numpy(_dataset(uri, version).take(np.asarray(offsets), columns=["feature"])["feature"])


@functools.lru_cache(maxsize=16)
def _dataset(uri: str, version: int):
    """An open Lance dataset per table version and process: opening reads the manifest, take() does not."""
    import lance

    return lance.dataset(uri, version=version)


def fingerprint(train: Pairs, val: Pairs) -> str:
    """What a run is trained and validated on: the features table (backbone, layer, dtype, shape),
    the provenance of the two groups it reads (weights, the images they were made from, ...) and the
    source images of both splits. Part of a run's digest, so features extracted again by other
    settings (`extract --overwrite`) or a changed selection of images means a new model."""
    payload = json.dumps({"meta": train.table_meta, "groups": train.groups, "shape": list(train.shape),
                          "itemsize": train.itemsize, "train": train.source_ids, "val": val.source_ids},
                         sort_keys=True)
    return hashlib.sha1(payload.encode()).hexdigest()[:16]


class PairLoader:
    """One worker's pairs as (rows, x, y) batches of torch tensors, in stored dtype.

    The worker's shard is every `world`-th pair. With `shuffle_seed` the shard is permuted every
    epoch by a generator seeded with (seed, epoch) alone, and cut to len(pairs) // world pairs so
    every worker takes the same number of steps (DDP); so a batch's content never depends on
    timing, on other runs trained alongside, or on a restart. Without it (validation) the whole
    shard is read in order. Shards up to `cache_bytes` are read from Lance once and kept in
    memory; larger ones are read batch by batch (a background thread reads the next batch while
    the current one trains).
    """

    def __init__(self, pairs: Pairs, *, batch_size: int, rank: int = 0, world: int = 1,
                 shuffle_seed: int | None = None, cache_bytes: int = 0):
        self.pairs, self.batch_size, self.world, self.shuffle_seed = pairs, batch_size, world, shuffle_seed
        self.shard = np.arange(rank, len(pairs), world, dtype=np.int64)
        self.steps_per_epoch = len(pairs) // world if shuffle_seed is not None else len(self.shard)
        nbytes = 2 * len(self.shard) * int(np.prod(pairs.shape)) * pairs.itemsize
        self.cache = None
        if nbytes <= cache_bytes:
            parts = [pairs.read(chunk) for chunk in np.array_split(self.shard, max(1, len(self.shard) // 256))]
            self.cache = tuple(torch.from_numpy(np.concatenate([p[i] for p in parts])) for i in (0, 1))

    def order(self, epoch: int) -> np.ndarray:
        """Positions in the shard, in the order epoch `epoch` reads them."""
        if self.shuffle_seed is None:
            return np.arange(len(self.shard))
        generator = torch.Generator().manual_seed(self.shuffle_seed * 1_000_003 + epoch)
        return torch.randperm(len(self.shard), generator=generator).numpy()[:self.steps_per_epoch]

    def _read(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = self.shard[positions]
        if self.cache is not None:
            index = torch.from_numpy(positions)
            return torch.from_numpy(rows), self.cache[0][index], self.cache[1][index]
        x, y = self.pairs.read(rows)  # read-only views of Arrow buffers: copied, as torch wants writable memory
        return torch.from_numpy(rows), torch.from_numpy(x.copy()), torch.from_numpy(y.copy())

    def batches(self, epoch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        order = self.order(epoch)
        chunks = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.cache is not None:
            yield from (self._read(c) for c in chunks)
            return
        with ThreadPoolExecutor(max_workers=1) as pool:  # Lance reads release the GIL
            pending = pool.submit(self._read, chunks[0]) if chunks else None
            for i in range(len(chunks)):
                batch = pending.result()
                pending = pool.submit(self._read, chunks[i + 1]) if i + 1 < len(chunks) else None
                yield batch


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
    x = tables.tensor_numpy(batch["feature"]).astype(np.float64)  # (N, C, H, W)
    if not np.isfinite(x).all():
        bad = [batch["source_id"][i].as_py() for i in np.flatnonzero(~np.isfinite(x).reshape(len(x), -1).all(1))]
        raise ValueError(f"non-finite values in the original feature maps of {bad[:5]}")
    values = x.transpose(1, 0, 2, 3).reshape(x.shape[1], -1)
    mean = values.mean(1)
    m2 = ((values - mean[:, None]) ** 2).sum(1)
    return pa.table({"n": [values.shape[1]], "mean": [mean.tolist()], "m2": [m2.tolist()], "maps": [len(x)]})


def channel_stats(st: tables.Store, *, dataset: str, backbone: str, layer: str, split: str = "train") -> ChannelStats:
    """Statistics of every original feature map of `dataset` in `split`, streamed through Ray Data
    and combined with Chan's parallel update (exact, numerically stable, any number of blocks)."""
    uri = st.layout.features(backbone, layer)
    ids = sorted(dataset_source_ids(st, dataset))
    if not ids:
        raise ValueError(f"no original images of dataset {dataset!r} in {st.layout.images}")
    filt = f"variant = '{tables.ORIGINAL}' AND split = '{split}' AND source_id IN ({tables.sql_list(ids)})"
    parts = base.read_ray(uri, columns=["source_id", "feature"], filter=filt).map_batches(
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


def _stats_key(st: tables.Store, *, dataset: str, backbone: str, layer: str) -> str:
    """What determines `channel_stats`: the training originals of `dataset` in the features table,
    named by their source ids and the data files that hold their rows. Lance never rewrites a data
    file, so maps written again (another extraction, `--overwrite`, a table made anew) are in other
    files; a compaction also moves them, which only costs a recomputation."""
    uri = st.layout.features(backbone, layer)
    table = st.open(uri)
    if table is None:
        raise FileNotFoundError(f"no features table for backbone {backbone!r} layer {layer!r} at {uri}")
    rows = table.to_table(columns=["source_id"], filter=f"variant = '{tables.ORIGINAL}' AND split = 'train'",
                          with_row_address=True)
    ids = dataset_source_ids(st, dataset)
    chosen = [i for i, sid in enumerate(rows["source_id"].to_pylist()) if sid in ids]
    fragments = {address >> 32 for address in rows["_rowaddr"].take(chosen).to_pylist()}  # high 32 bits: fragment
    files = sorted(f.path for fragment in fragments for f in table.get_fragment(fragment).data_files())
    return seeding.fingerprint({"source_ids": sorted(rows["source_id"].take(chosen).to_pylist()), "files": files})


def cached_channel_stats(st: tables.Store, *, dataset: str, backbone: str, layer: str) -> ChannelStats:
    """`channel_stats`, cached per (dataset, backbone, layer) at `Layout.norm_stats`, and recomputed
    when what determines them (`_stats_key`) has changed."""
    path = st.layout.norm_stats(dataset, backbone, layer)
    key = _stats_key(st, dataset=dataset, backbone=backbone, layer=layer)
    if path.exists():
        cached = path.read_json()
        if cached.get("key") == key:
            return ChannelStats.from_json(cached)
    stats = channel_stats(st, dataset=dataset, backbone=backbone, layer=layer)
    path.write_json({"key": key, **stats.to_json()})  # atomic: a reader never sees half a file
    return stats
