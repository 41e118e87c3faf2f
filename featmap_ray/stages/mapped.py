"""Mapped feature maps of a finished mapping run, as a Ray Dataset shaped like a features table.

Each row is the run's prediction for one held-out pair: the original's feature map mapped by the
run's model, keyed by (source_id, variant = the manipulation), so that `featmap reconstruct` can
turn it into an image and compare it with the real manipulated image.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from featmap_ray.config import Config
from featmap_ray.featinv import identity
from featmap_ray.io import tables
from featmap_ray.io.files import Location
from featmap_ray.mapping.artefacts import (
    MODEL_FILE,
    finished_runs,
    load_run,
    published_version,
    read_info,
    runs_root,
)
from featmap_ray.mapping.grid import RunSpec
from featmap_ray.stages import pairs as data


class _MapWithRun:
    """Ray Data actor: loads the run's model once, then maps batch after batch."""

    def __init__(self, run_dir: str, pairs: data.Pairs, split: str):
        self.model, spec, _ = load_run(run_dir)
        self.pairs, self.split, self.manipulation = pairs, split, spec.manipulation

    def __call__(self, batch: pa.Table) -> pa.Table:
        x, _ = self.pairs.read(batch["row"].to_numpy())
        with torch.no_grad():
            mapped = self.model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()
        n = batch.num_rows
        return pa.table({"source_id": batch["source_id"], "variant": [self.manipulation] * n,
                         "split": [self.split] * n, "class_idx": batch["class_idx"],
                         "feature": tables.tensor_array(mapped)})


def mapped_pairs(cfg: Config, run_key: str, split: str = "test") -> tuple[Location, dict, data.Pairs]:
    """A finished run `run_key` of the study: its folder, its run.json, and the held-out pairs of `split` it maps."""
    run_dir = runs_root(cfg) / run_key
    info = read_info(run_dir)
    if info is None:
        finished = [p.name for p in finished_runs(cfg)]
        raise FileNotFoundError(f"no finished mapping run {run_key!r} in study {cfg.mapping.study!r}; "
                                f"finished: {finished[:10]}")
    spec = RunSpec.from_dict(info["spec"])
    pairs = data.load_pairs(tables.Store(cfg.storage), dataset=spec.dataset, backbone=spec.backbone, layer=spec.layer,
                            manipulation=spec.manipulation, split=split)
    if len(pairs) == 0:
        raise ValueError(f"mapping run {run_key}: no {split} pairs to map")
    return run_dir, info, pairs


def run_identity(run_dir: Location, info: dict) -> str:
    """A published run as its consumers' provenance names it: its key, its digest (the settings and data
    it was fitted with) and the content of its weights (a refit with the same digest is another model)."""
    weights = identity.content_digest(published_version(run_dir) / MODEL_FILE)
    return f"{run_dir.name} (digest {info['digest']}, weights {weights})"


def mapped_features(run_dir: Location, pairs: data.Pairs, split: str):
    """The Ray Dataset of the run's mapped maps of `pairs` (see `mapped_pairs`), keyed (source_id, manipulation)."""
    import ray.data

    index = pa.table({"row": np.arange(len(pairs), dtype=np.int64), "source_id": pairs.source_ids,
                      "class_idx": pairs.class_idx.astype(np.int32)})
    return ray.data.from_arrow(index).map_batches(
        _MapWithRun, fn_constructor_kwargs={"run_dir": str(run_dir), "pairs": pairs, "split": split},
        batch_format="pyarrow", batch_size=64, concurrency=1)
