"""Ray Data stage: image variants in `images` -> backbone feature maps in `features/<backbone>/<layer>`.

Decode + resize + centre-crop is one map step, the forward pass another, in an actor pool (the
model is loaded once per actor, `extract.num_gpus` GPUs each, 0 on CPU). With GPUs the decode step
runs as CPU tasks beside the actors, so a GPU never waits on PNG decoding; on CPU Ray Data fuses the
two steps into the actor. One forward fills every requested layer of a backbone. Each layer table
only receives the keys it does not hold yet.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from featmap_ray import backbones, runtime
from featmap_ray.config import BackboneRequest, Config
from featmap_ray.io import imageio, tables
from featmap_ray.stages import base

NAME = "extract"
LABELS = ("source_id", "variant", "split", "class_idx")


def feature_column(layer: str) -> str:
    return f"feature:{layer}"


def preprocess_batch(batch: pa.Table, size: int, pending: frozenset[tuple[str, str]]) -> pa.Table:
    """Ray Data UDF (CPU): stored PNGs -> uint8 (N, size, size, 3) backbone inputs, pending rows only."""
    rows = [r for r in batch.to_pylist() if (r["source_id"], r["variant"]) in pending]
    pixels = np.zeros((len(rows), size, size, 3), np.uint8)
    reasons, messages = [None] * len(rows), [None] * len(rows)
    for i, row in enumerate(rows):
        try:
            img = Image.fromarray(imageio.decode_png_rgb(row["image"]))
            pixels[i] = np.asarray(imageio.resize_center_crop(img, size))
        except Exception as e:  # a corrupt stored image: recorded, the job goes on
            reasons[i], messages[i] = type(e).__name__, f"decoding stored image {row['source_id']}/{row['variant']}: {e}"
    return pa.table({**{k: pa.array([r[k] for r in rows], batch.schema.field(k).type) for k in LABELS},
                     "pixels": tables.tensor_array(pixels), "error_reason": pa.array(reasons, pa.string()),
                     "error_message": pa.array(messages, pa.string())})


class FeatureExtractor:
    """Ray Data actor: uint8 pixels -> one fixed-shape tensor column per layer."""

    def __init__(self, request: BackboneRequest, layers: list[str], dtype: str, use_gpu: bool, torch_threads: int | None):
        self.device = runtime.actor_device(use_gpu, torch_threads)
        self.spec = backbones.get_spec(request.name)
        self.model = backbones.build_model(self.spec, request, self.device)
        self.layers, self.dtype = layers, dtype

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        if n == 0:  # every row of the batch was already stored
            return batch.drop_columns(["pixels"])
        reasons, messages = batch["error_reason"].to_pylist(), batch["error_message"].to_pylist()
        ids, variants = batch["source_id"].to_pylist(), batch["variant"].to_pylist()
        features = {}
        try:
            with torch.inference_mode():
                pixels = torch.from_numpy(tables.tensor_numpy(batch["pixels"]).copy())  # Arrow memory is read-only
                x = backbones.normalise(pixels.to(self.device), self.spec)
                taps = backbones.forward_taps(self.model, self.spec, self.layers, x)
            for layer, t in taps.items():
                values = backbones.to_numpy(t, self.dtype)
                finite = np.isfinite(values.reshape(n, -1)).all(axis=1)
                for i in np.flatnonzero(~finite):
                    if reasons[i] is None:
                        reasons[i], messages[i] = "non_finite", f"{self.spec.name}/{layer} of {ids[i]}/{variants[i]} has NaN or Inf values"
                features[feature_column(layer)] = tables.tensor_array(values)
        except Exception as e:  # e.g. out of memory: the batch is recorded as failed, the job goes on
            reasons = [reasons[i] or type(e).__name__ for i in range(n)]
            messages = [messages[i] or f"{self.spec.name} forward: {e}" for i in range(n)]
            features = {}
        # Without features (the forward failed) the block still carries labels and failures.
        return pa.table({**{k: batch[k] for k in LABELS}, **features, "error_reason": pa.array(reasons, pa.string()),
                         "error_message": pa.array(messages, pa.string())})


def _targets(st: tables.Store, spec: backbones.BackboneSpec, request: BackboneRequest, layers: list[str],
             dtype: str) -> list[tables.Target]:
    shapes = backbones.feature_shapes(spec, request, layers)
    targets = []
    for layer in layers:
        meta = {"backbone": spec.name, "timm_name": spec.timm_name, "layer": layer, "input_size": spec.input_size,
                "pretrained": request.pretrained, "checkpoint": request.checkpoint, "dtype": dtype,
                "layout": "CHW", "tap_index": spec.taps[layer]}
        schema = tables.feature_schema(shapes[layer], dtype, meta)
        targets.append(tables.Target(st.layout.features(spec.name, layer), schema, columns={"feature": feature_column(layer)}))
    return targets


def run(cfg: Config) -> list[base.StageSummary]:
    import ray.data

    st = tables.Store(cfg.storage)
    ex = cfg.extract
    # Check every backbone (name, layers, weights, shapes of existing tables) before anything is written.
    plans = []
    for request in ex.backbones:
        spec = backbones.get_spec(request.name)
        layers = backbones.resolve_layers(spec, request.layers)
        backbones.check_weights(spec, request)
        targets = _targets(st, spec, request, layers, ex.dtype)
        for t in targets:
            tables.check_schema(t.uri, t.schema)
        plans.append((request, spec, layers, targets))
    keys = st.keys(st.layout.images)
    if not keys:
        raise FileNotFoundError(f"no images in {st.layout.images}: run `featmap ingest` (and `featmap manipulate`) first")

    summaries = []
    for request, spec, layers, targets in plans:
        done = [st.keys(t.uri) for t in targets]
        # A key missing from any layer table is computed again; the sink writes each table only
        # the keys it lacks.
        pending = frozenset(k for k in keys if any(k not in d for d in done))
        ds = None
        if pending:
            ds = (
                st.read_ray(st.layout.images, columns=["source_id", "variant", "split", "class_idx", "image"])
                .map_batches(preprocess_batch, batch_size=ex.batch_size, batch_format="pyarrow",
                             fn_kwargs={"size": spec.input_size, "pending": pending})
                .map_batches(FeatureExtractor, batch_size=ex.batch_size, batch_format="pyarrow",
                             fn_constructor_args=(request, layers, ex.dtype, ex.num_gpus > 0, ex.torch_threads),
                             compute=ray.data.ActorPoolStrategy(size=ex.num_actors), num_gpus=ex.num_gpus)
            )
        summaries.append(base.write_stage(st, f"{NAME}:{spec.name}", ds, targets, rows_per_commit=ex.rows_per_commit,
                                           skipped=len(keys) - len(pending)))
    return summaries
