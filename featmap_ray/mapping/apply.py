"""Mapped feature maps of a finished mapping run, as a Ray Dataset shaped like a features table.

Each row is the run's prediction for one held-out pair: the original's feature map mapped by the
run's model, keyed by (source_id, variant = the manipulation), so that `featmap reconstruct` can
turn it into an image and compare it with the real manipulated image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from featmap_ray import store
from featmap_ray.config import Config


def _map_batch(batch: pa.Table, run_dir: str, manipulation: str, split: str, uri: str) -> pa.Table:
    from featmap_ray.mapping.data import read_features
    from featmap_ray.mapping.artefacts import load_run

    model, _, _ = load_run(run_dir)
    x = read_features(uri, batch["x_offset"].to_numpy())
    with torch.no_grad():
        mapped = model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()
    n = batch.num_rows
    return pa.table({"source_id": batch["source_id"], "variant": [manipulation] * n, "split": [split] * n,
                     "class_idx": batch["class_idx"], "feature": store.tensor_array(mapped)})


def mapped_features(cfg: Config, run_key: str, split: str = "test"):
    """(Ray Dataset of mapped maps, their (source_id, variant) keys) for run `run_key` of the study."""
    import ray.data

    from featmap_ray.mapping import data
    from featmap_ray.mapping.artefacts import RUN_FILE, load_run, runs_root

    run_dir = runs_root(cfg) / run_key
    if not (run_dir / RUN_FILE).exists():
        finished = sorted(p.parent.name for p in runs_root(cfg).glob(f"*/{RUN_FILE}"))
        raise FileNotFoundError(f"no finished mapping run {run_key!r} in study {cfg.mapping.study!r}; "
                                f"finished: {finished[:10]}")
    _, spec, _ = load_run(run_dir)
    pairs = data.load_pairs(store.Store(cfg.storage), dataset=spec.dataset, backbone=spec.backbone, layer=spec.layer,
                            manipulation=spec.manipulation, split=split)
    if len(pairs) == 0:
        raise ValueError(f"mapping run {run_key}: no {split} pairs to map")
    index = pa.table({"source_id": pairs.source_ids, "class_idx": pairs.class_idx.astype(np.int32),
                      "x_offset": pairs.x_offsets})
    ds = ray.data.from_arrow(index).map_batches(
        _map_batch, batch_format="pyarrow", batch_size=64,
        fn_kwargs={"run_dir": str(Path(run_dir)), "manipulation": spec.manipulation, "split": split, "uri": pairs.uri})
    return ds, [(sid, spec.manipulation) for sid in pairs.source_ids]
