"""Ray Data stage: image variants in `images` -> backbone feature maps in `features/<backbone>/<layer>`.

Decode + resize + centre-crop is one map step, the forward pass another, in an actor pool (the
model is loaded once per actor, `extract.num_gpus` GPUs each, 0 on CPU). With GPUs the decode step
runs as CPU tasks beside the actors, so a GPU never waits on PNG decoding; on CPU Ray Data fuses the
two steps into the actor. One forward fills every requested layer of a backbone. Each layer table
only receives the keys it does not hold yet.

Provenance (stages/base.py): each image variant is one group of every features table, made by the
backbone (name, timm model and its kwargs), the weights source (random + `init_seed`, timm's pretrained
tag, or a checkpoint path with a sha256 of its content), the layer and its tap, the dtype, the input size,
the compute dtype when not float32 (`extract.compute_dtype`: bfloat16/float16 autocast), and the images
group of that variant it read. Other weights refuse before writing; a variant made again
upstream (another manipulate seed, say) makes exactly its features rows stale; `--overwrite` recomputes
exactly the stale rows. Another backbone or layer is another table, written alongside.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from featmap_ray import backbones, seeding
from featmap_ray.config import BackboneRequest, Config
from featmap_ray.io import imageio, tables
from featmap_ray.stages import base, runtime

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

    def __init__(self, request: BackboneRequest, layers: list[str], dtype: str, use_gpu: bool, torch_threads: int | None,
                 compute_dtype: str = "float32", channels_last: bool = False):
        self.device = runtime.actor_device(use_gpu, torch_threads)
        self.spec = backbones.get_spec(request.name)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = backbones.build_model(self.spec, request, self.device).to(memory_format=self.memory_format)
        self.autocast = None if compute_dtype == "float32" else getattr(torch, compute_dtype)
        self.layers, self.dtype = layers, dtype

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        if n == 0:  # every row of the batch was already stored
            return batch.drop_columns(["pixels"])
        reasons, messages = batch["error_reason"].to_pylist(), batch["error_message"].to_pylist()
        ids, variants = batch["source_id"].to_pylist(), batch["variant"].to_pylist()
        features = {}
        try:
            with torch.inference_mode(), torch.autocast(self.device.type, self.autocast, enabled=self.autocast is not None):
                pixels = torch.from_numpy(tables.tensor_numpy(batch["pixels"]).copy())  # Arrow memory is read-only
                x = backbones.normalise(pixels.to(self.device), self.spec).contiguous(memory_format=self.memory_format)
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


def weights_source(request: BackboneRequest, spec: backbones.BackboneSpec) -> dict[str, object]:
    """Where a backbone's weights come from: random from `init_seed`, timm's pretrained tag (the hub
    weights of `timm_name`), or a checkpoint file with a hash of its content (the same path may hold
    other weights tomorrow)."""
    if not request.pretrained:
        return {"weights": "random", "init_seed": request.init_seed}
    if request.checkpoint:
        path = str(Path(request.checkpoint).expanduser())
        return {"weights": "checkpoint", "checkpoint": request.checkpoint, "checkpoint_sha256": seeding.file_digest(path)}
    return {"weights": f"pretrained {spec.timm_name}"}


@dataclass(frozen=True)
class LayerTable:
    """One features table this run writes, and the settings that make its rows."""

    target: tables.Target
    settings: dict[str, object]


@dataclass(frozen=True)
class BackbonePlan:
    request: BackboneRequest
    spec: backbones.BackboneSpec
    layers: list[str]
    layer_tables: list[LayerTable]


def plan_backbones(cfg: Config, st: tables.Store) -> list[BackbonePlan]:
    """Every extract.backbones entry with its layer tables (schemas checked against existing tables) and
    each table's settings: backbone, timm model and its kwargs, weights source, layer and tap, dtype, input size."""
    plans, seen = [], set()
    for request in cfg.extract.backbones:
        spec = backbones.get_spec(request.name)
        layers = backbones.resolve_layers(spec, request.layers)
        shapes = backbones.feature_shapes(spec, request, layers)
        weights = weights_source(request, spec)
        layer_tables = []
        for layer in layers:
            uri = st.layout.features(spec.name, layer)
            if uri in seen:
                raise ValueError(f"extract.backbones: {spec.name} layer {layer} is requested twice; one table holds "
                                 "one backbone's maps (list each layer once)")
            seen.add(uri)
            meta = {"backbone": spec.name, "timm_name": spec.timm_name, "layer": layer, "input_size": spec.input_size,
                    "dtype": cfg.extract.dtype, "layout": "CHW", "tap_index": spec.taps[layer]}
            schema = tables.feature_schema(shapes[layer], cfg.extract.dtype, meta)
            tables.check_schema(uri, schema)
            settings = {**meta, "model_kwargs": request.model_kwargs, **weights}
            settings.pop("layout")  # the stored layout of every table, not a setting
            if cfg.extract.compute_dtype != "float32":  # absent at float32: tables made before it keep their provenance
                settings["compute_dtype"] = cfg.extract.compute_dtype
            layer_tables.append(LayerTable(tables.Target(uri, schema, columns={"feature": feature_column(layer)}), settings))
        plans.append(BackbonePlan(request, spec, layers, layer_tables))
    return plans


def variant_groups(st: tables.Store, table: LayerTable, variants: list[str], images: dict[str, str]) -> list[base.Group]:
    """One group of a features table per image variant: the table's settings and the images group it
    reads (`images`: the images table's fingerprints, by input key), so a variant made again by other
    settings makes exactly its features stale."""
    groups = []
    for variant in variants:
        key = base.input_key(st.root, st.layout.images, variant)
        inputs = {key: images[key]} if key in images else {}
        groups.append(base.Group(variant, base.Provenance(table.settings, inputs), base.group_filter("variant", variant)))
    return groups


def run(cfg: Config) -> list[base.StageSummary]:
    import ray.data

    st = tables.Store(cfg.storage)
    ex = cfg.extract
    # Check every backbone (name, layers, weights, shapes of existing tables) before anything is written.
    for request in ex.backbones:
        backbones.check_weights(backbones.get_spec(request.name), request)
    plans = plan_backbones(cfg, st)
    keys = st.keys(st.layout.images)
    if not keys:
        raise FileNotFoundError(f"no images in {st.layout.images}: run `featmap ingest` (and `featmap manipulate`) first")
    variants = sorted({v for _, v in keys})
    images = base.input_fingerprints(st.root, st.layout.images, variants)
    overwritten = base.reconcile(NAME, [(t.target, variant_groups(st, t, variants, images))
                                        for p in plans for t in p.layer_tables], overwrite=cfg.overwrite)

    summaries = []
    for plan in plans:
        request, spec, layers, targets = plan.request, plan.spec, plan.layers, [t.target for t in plan.layer_tables]
        done = [st.keys(t.uri) for t in targets]
        # A key missing from any layer table is computed again; the sink writes each table only
        # the keys it lacks.
        pending = frozenset(k for k in keys if any(k not in d for d in done))
        ds = None
        if pending:
            ds = (
                base.read_ray(st.layout.images, columns=["source_id", "variant", "split", "class_idx", "image"])
                .map_batches(preprocess_batch, batch_size=ex.batch_size, batch_format="pyarrow",
                             fn_kwargs={"size": spec.input_size, "pending": pending})
                .map_batches(FeatureExtractor, batch_size=ex.batch_size, batch_format="pyarrow",
                             fn_constructor_args=(request, layers, ex.dtype, ex.num_gpus > 0, ex.torch_threads,
                                                  ex.compute_dtype, ex.channels_last),
                             compute=ray.data.ActorPoolStrategy(size=ex.num_actors), num_gpus=ex.num_gpus)
            )
        uris = {t.uri for t in targets}
        summaries.append(base.write_stage(st, f"{NAME}:{spec.name}", ds, targets, rows_per_commit=ex.rows_per_commit,
                                           skipped=len(keys) - len(pending),
                                           overwritten=sum(m.rows for m in overwritten if m.uri in uris)))
    return summaries


def status(cfg: Config) -> list[base.OutputStatus]:
    """Every features table of this config against it; partial counts the images table's rows per variant."""
    st = tables.Store(cfg.storage)
    counts: dict[str, int] = defaultdict(int)
    for _, variant in st.keys(st.layout.images):
        counts[variant] += 1
    images = base.input_fingerprints(st.root, st.layout.images, sorted(counts))
    return [base.table_status(NAME, t.target.uri, variant_groups(st, t, sorted(counts), images), counts)
            for p in plan_backbones(cfg, st) for t in p.layer_tables]


def check_backbones(cfg: Config) -> None:
    """Every extract.backbones entry: a registry (or timm) name, its layers, its weights."""
    for request in cfg.extract.backbones:
        spec = backbones.get_spec(request.name)
        backbones.resolve_layers(spec, request.layers)
        backbones.check_weights(spec, request)


def command(cfg: Config) -> str:
    return base.run_pipeline_stage(cfg, NAME, base.images_input(cfg), lambda: run(cfg))


STAGE = base.Stage(
    NAME, "images -> feature maps in features/<backbone>/<layer>.lance", command,
    details="Runs every extract.backbones entry over every image (originals and variants) in a Ray Data actor pool "
            "and stores the requested layers.",
    keys=(*base.RAY_KEYS, "extract", "extract.backbones"), checks=(check_backbones, base.check_images), reads=("images",),
    writes=("features", "errors"), epilogue=base.describe_tables, status=status)
