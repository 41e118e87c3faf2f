"""Ray Data job: feature maps -> FeatInv reconstructions, with metrics, in `reconstructions/<backbone>/<layer>`.

An actor pool (`featinv.sampling.num_actors` actors, `num_gpus` each) loads the FeatInv model and
the backbone once per actor and samples a batch of feature maps at a time. Each row is keyed
(source_id, variant, generator, seed): `generator` names what produced the map ("extracted" for
the maps of `featmap extract`, a mapping's name for mapped maps) and `seed` seeds the initial
latent (the reference uses 100 for every image: `sampling.seed`; sample i of a map uses seed + i).
Per row the job stores the PNG, the median per-position cosine between the map and the
reconstruction's map, and whether the backbone's classifier agrees on the reconstruction and the
stored source image of the same key (top-1 / top-5(1) match). Then FID over every stored row of the
generator. Maps with the wrong shape or NaNs become rows of errors.lance.

Provenance (stages.base): the rows of one (generator, variant) are a group that records the FeatInv model
(the content of its weights: featinv.identity), the sampler settings, the scoring backbone, and the
features groups (or the mapping run) its maps came from. A re-run with the same skips stored keys;
another setting refuses before anything is written, naming it, and `overwrite` recomputes that group.
"""

from __future__ import annotations

import collections
import contextlib
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from featmap_ray import backbones
from featmap_ray.config import Config
from featmap_ray.cosine import median_cosine
from featmap_ray.featinv import data, fid, identity, metrics
from featmap_ray.io import imageio, tables, tracking
from featmap_ray.stages import base, runtime
from featmap_ray.stages.featinv_train import FEATINV_KEYS

# diffusers (featinv.loading, featinv.model, featinv.pipeline) is imported where it is used: Ray Data
# task workers that only run this module's light UDFs then start without it.

NAME = "reconstruct"
EXTRACTED = "extracted"  # the generator of the maps in the features table
LABELS = ("source_id", "variant", "split", "class_idx")
ROW_METRICS = ("cos_median_lower", "top1_match", "top5_match")
GENERATOR_NAME = re.compile(r"^[A-Za-z0-9_.:/=+-]+$")


# -- The Ray Data stage ------------------------------------------------------------------------

def select_pending(batch: dict[str, np.ndarray], seeds: list[int], done: frozenset[tuple[str, str, int]],
                   keep: frozenset[tuple[str, str]]) -> dict[str, np.ndarray]:
    """Ray Data UDF: the feature maps of `keep` with the seeds they are not stored with yet."""
    rows, pending = [], []
    for i, key in enumerate(zip(batch["source_id"], batch["variant"], strict=True)):
        todo = [seed for seed in seeds if (*key, seed) not in done]
        if todo and key in keep:
            rows.append(i)
            pending.append(todo)
    out = {k: batch[k][rows] for k in (*LABELS, "feature")}
    out["seeds"] = np.empty(len(rows), object)  # one list per map
    for i, todo in enumerate(pending):
        out["seeds"][i] = todo
    return out


class Reconstructor:
    """Ray Data actor: feature maps + seeds -> reconstruction rows (PNG and per-row metrics) or failure rows.
    `controlnet`: the ControlNet as the driver resolved it (an MLflow alias pinned to its version)."""

    def __init__(self, cfg: Config, generator: str, schema: pa.Schema, controlnet: str | None = None):
        from featmap_ray.featinv import loading

        self.device = runtime.actor_device(cfg.featinv.sampling.num_gpus > 0)
        self.sampling = cfg.featinv.sampling
        self.pipe = loading.featinv_pipeline(cfg, controlnet).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)  # one bar per batch would flood the actors' logs
        request, layer = data.featinv_backbone(cfg)
        self.probe = metrics.BackboneProbe(request, layer, self.device)
        self.store = tables.Store(cfg.storage)
        self.generator, self.schema = generator, tables.with_error_columns(schema)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        from featmap_ray.featinv.model import FeatureMismatch

        rows, features, good = [], [], []
        for i, seeds in enumerate(batch["seeds"]):
            labels = {k: batch[k][i] for k in LABELS}
            feature = torch.as_tensor(np.asarray(batch["feature"][i], np.float32))[None]
            try:
                self.pipe.controlnet.check_features(feature)
            except FeatureMismatch as e:  # one failure row per map, whatever the number of seeds
                rows.append({**labels, "generator": self.generator, "seed": int(seeds[0]),
                             **tables.failure("feature_mismatch", f"{labels['source_id']}/{labels['variant']} "
                                                                 f"({self.generator}): {e}")})
                continue
            for seed in seeds:
                rows.append({**labels, "generator": self.generator, "seed": int(seed)})
                features.append(feature)
                good.append(rows[-1])
        if good:
            try:
                self._reconstruct(torch.cat(features).to(self.device), good)
            except Exception as e:  # e.g. out of memory: the batch is recorded as failed, the job goes on
                for row in good:
                    where = f"{row['source_id']}/{row['variant']}"
                    row.update(tables.failure(type(e).__name__, f"FeatInv sampling of {where}: {e}"))
        return pa.Table.from_pylist(rows, schema=self.schema)

    def _reconstruct(self, features: torch.Tensor, rows: list[dict]) -> None:
        from featmap_ray.featinv.pipeline import seeded_generators

        s = self.sampling
        images = self.pipe(features, seeded_generators([r["seed"] for r in rows]), num_inference_steps=s.steps,
                           guidance_scale=s.guidance, prompt=s.prompt, negative_prompt=s.negative_prompt,
                           controlnet_conditioning_scale=s.control_scale).images
        pixels = torch.from_numpy(np.stack([np.asarray(image) for image in images]))
        cosine = median_cosine(features, self.probe.features(pixels), "lower").tolist()  # torch.median, as FeatInv
        agreement = [(None, None, None)] * len(rows)
        if self.probe.has_classifier:
            keys = [(r["source_id"], r["variant"]) for r in rows]
            sources = data.stored_views(self.store, keys, self.probe.spec.input_size)
            have = [i for i, k in enumerate(keys) if k in sources]
            if have:
                source_logits = self.probe.logits(torch.from_numpy(np.stack([sources[keys[i]] for i in have])))
                top1, match1, match5 = metrics.classifier_agreement(source_logits, self.probe.logits(pixels[have]))
                for j, i in enumerate(have):
                    agreement[i] = (int(top1[j]), bool(match1[j]), bool(match5[j]))
        for row, image, cos, (top1, match1, match5) in zip(rows, images, cosine, agreement, strict=True):
            row.update(image=imageio.encode_png(image), width=image.width, height=image.height,
                       cos_median_lower=cos, source_top1=top1, top1_match=match1, top5_match=match5)


# -- Evaluation over the stored rows ------------------------------------------------------------

class FidFeatures:
    """Ray Data actor: stored reconstructions -> FID features of each and of its stored source image,
    with the row's per-row metrics as floats (NaN where null)."""

    def __init__(self, cfg: Config):
        device = runtime.actor_device(cfg.featinv.sampling.num_gpus > 0)
        request, layer = data.featinv_backbone(cfg)
        self.probe = metrics.BackboneProbe(request, layer, device)
        self.extractor = fid.fid_extractor(cfg.featinv.eval.fid_inception_weights, self.probe)
        self.store = tables.Store(cfg.storage)

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        keys = list(zip(batch["source_id"].to_pylist(), batch["variant"].to_pylist(), strict=True))
        images = np.stack([imageio.decode_png_rgb(png) for png in batch["image"].to_pylist()])
        reconstruction = self.extractor(torch.from_numpy(images))
        sources = data.stored_views(self.store, keys, self.probe.spec.input_size)
        have = np.array([k in sources for k in keys], bool)
        source = np.full_like(reconstruction, np.nan)
        if have.any():
            source[have] = self.extractor(torch.from_numpy(np.stack([sources[k] for k in keys if k in sources])))
        out = {"reconstruction": reconstruction.astype(np.float32), "source": source.astype(np.float32),
               "has_source": have}
        for name in ROW_METRICS:
            out[name] = batch[name].cast(pa.float64()).to_numpy(zero_copy_only=False)
        return out


@dataclass
class ReconstructionMetrics:
    generator: str
    rows: int
    cos_median_lower: float | None  # mean over rows of the median per-position cosine (rule lower)
    top1_match: float | None  # fractions over rows with a classifier prediction of the source image
    top5_match: float | None
    fid: float | None  # None with fewer than 2 rows that have a stored source image
    fid_extractor: str

    def mlflow_metrics(self) -> dict[str, float]:
        values = {"rows": self.rows, "cos_median_lower": self.cos_median_lower, "top1_match": self.top1_match,
                  "top5_match": self.top5_match, "fid": self.fid}
        return {k: float(v) for k, v in values.items() if v is not None}

    def __str__(self) -> str:
        def fmt(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.4f}"

        return (f"[{NAME}:{self.generator}] {self.rows} reconstructions: "
                f"median cosine (lower) {fmt(self.cos_median_lower)}, "
                f"top-1 match {fmt(self.top1_match)}, top-5(1) match {fmt(self.top5_match)}, "
                f"FID {fmt(self.fid)} ({self.fid_extractor})")


def _seeds(cfg: Config) -> list[int]:
    s = cfg.featinv.sampling
    return [s.seed + i for i in range(s.num_samples)]


def _generator_filter(generator: str) -> str:
    if not GENERATOR_NAME.match(generator):
        raise ValueError(f"generator {generator!r}: use letters, digits and _.:/=+- only")
    return base.group_filter("generator", generator)


def _rows_filter(generator: str, seeds: Iterable[int]) -> str:
    return f"{_generator_filter(generator)} AND seed IN ({', '.join(str(s) for s in seeds)})"


def evaluate(cfg: Config, generator: str) -> ReconstructionMetrics:
    """Metrics over every stored reconstruction of `generator` with the configured seeds."""
    import ray.data

    request, layer = data.featinv_backbone(cfg)
    st = tables.Store(cfg.storage)
    s = cfg.featinv.sampling
    ds = base.read_ray(st.layout.reconstructions(request.name, layer), filter=_rows_filter(generator, _seeds(cfg)),
                     columns=["source_id", "variant", "image", *ROW_METRICS])
    features = ds.map_batches(FidFeatures, fn_constructor_args=(cfg,), batch_size=s.batch_size, batch_format="pyarrow",
                              compute=ray.data.ActorPoolStrategy(size=s.num_actors), num_gpus=s.num_gpus)
    parts: dict[str, list[np.ndarray]] = {}
    for batch in features.iter_batches(batch_format="numpy", batch_size=None):
        for name, values in batch.items():
            parts.setdefault(name, []).append(values)
    columns = {name: np.concatenate(values) for name, values in parts.items()}

    def mean(name: str) -> float | None:
        values = columns.get(name, np.zeros(0))
        values = values[~np.isnan(values)]
        return float(values.mean()) if len(values) else None

    distance = None
    have = columns.get("has_source", np.zeros(0, bool))
    if have.sum() >= 2:
        distance = fid.fid(columns["source"][have], columns["reconstruction"][have])
    name = fid.fid_extractor_name(cfg.featinv.eval.fid_inception_weights, backbones.get_spec(request.name))
    return ReconstructionMetrics(generator, len(have), mean("cos_median_lower"), mean("top1_match"), mean("top5_match"),
                                 distance, name)


# -- The job ------------------------------------------------------------------------------------

@dataclass
class ReconstructReport(base.StageSummary):
    """The stage summary plus the metrics over every stored row of the generator."""

    metrics: ReconstructionMetrics | None = None

    def __str__(self) -> str:
        return super().__str__() + (f"\n{self.metrics}" if self.metrics else "")


@dataclass(frozen=True)
class Maps:
    """The feature maps a run reconstructs: their (source_id, variant) `keys`, reconstructed as `generator`;
    per variant, the groups of the features table its maps come from (`read`), and what else made them
    (`made_by`: a mapping run, `mapped.run_identity`)."""

    generator: str
    keys: list[tuple[str, str]]
    read: dict[str, list[str]]
    made_by: dict[str, str] = field(default_factory=dict)

    def groups(self, cfg: Config, model: dict[str, str]) -> list[base.Group]:
        """The table's groups these maps make, one per (generator, variant), and what makes their rows: the
        FeatInv model (`model`: identity.model_identity), the sampler, the backbone that scores them, the
        features groups read and what else made the maps."""
        request, layer = data.featinv_backbone(cfg)
        features = tables.Store(cfg.storage).layout.features(request.name, layer)
        settings = {**model, **identity.sampler_settings(cfg), **self.made_by,
                    "featinv.backbone": request.model_dump(mode="json", exclude={"layers"}), "featinv.layer": layer}
        return [base.Group(f"{self.generator}/{variant}",
                           base.Provenance(settings, base.input_fingerprints(cfg.storage, features, sources)),
                           f"{_generator_filter(self.generator)} AND {base.group_filter('variant', variant)}")
                for variant, sources in sorted(self.read.items())]


@contextlib.contextmanager
def _mlflow_run(cfg: Config, name: str) -> Iterator[None]:
    """A run of its own, or a child of the caller's active run (e.g. the CLI's stage run)."""
    import mlflow

    active = mlflow.active_run()
    if active is None:
        with tracking.stage_run(cfg, name):
            yield
    else:
        with mlflow.start_run(run_name=name, nested=True, experiment_id=active.info.experiment_id):
            yield


def _log(cfg: Config, report: ReconstructReport) -> None:
    import mlflow

    m = report.metrics
    request, layer = data.featinv_backbone(cfg)
    features = tracking.table_input(cfg, tables.Store(cfg.storage).layout.features(request.name, layer))
    with _mlflow_run(cfg, report.stage):
        tracking.log_table_inputs(None, mlflow.active_run().info.run_id, [features], context="evaluation")
        mlflow.set_tags({"generator": m.generator, "fid_extractor": m.fid_extractor})
        mlflow.log_metrics({**m.mlflow_metrics(), "written": sum(report.written.values()), "skipped": report.skipped,
                            "failed": report.failed})


def reconstruct_dataset(cfg: Config, ds, maps: Maps) -> ReconstructReport:
    """Reconstruct the feature maps of `ds` (columns source_id, variant, split, class_idx and a (C, H, W)
    tensor `feature`) of `maps.keys` that the table lacks for the generator and the configured seeds,
    then evaluate all stored rows of the generator and log an MLflow run.

    Rows of these keys' groups that other settings made refuse the run before anything is written, or
    with `overwrite` are deleted and made again (`base.reconcile`)."""
    import ray.data

    request, layer = data.featinv_backbone(cfg)
    backbones.check_weights(backbones.get_spec(request.name), request)  # fail here, not in every actor
    st = tables.Store(cfg.storage)
    s = cfg.featinv.sampling
    uri = st.layout.reconstructions(request.name, layer)
    pinned = identity.pinned_controlnet(cfg)
    target = tables.Target(uri, tables.reconstructions_schema(), key=tables.RECONSTRUCTION_KEY)
    overwritten = base.reconcile(NAME, [(target, maps.groups(cfg, identity.model_identity(cfg, pinned)))],
                                 overwrite=cfg.overwrite)
    generator, seeds = maps.generator, _seeds(cfg)
    done = frozenset((sid, variant, seed) for seed in seeds
                     for sid, variant in st.keys(uri, filter=_rows_filter(generator, [seed])))
    keep = frozenset(maps.keys)
    skipped = sum((sid, variant) in keep for sid, variant, _ in done)
    pipeline = None
    if len(keep) * len(seeds) > skipped:
        pipeline = (
            ds.map_batches(select_pending, batch_size=s.batch_size, batch_format="numpy",
                           fn_kwargs={"seeds": seeds, "done": done, "keep": keep})
            .map_batches(Reconstructor, batch_size=s.batch_size, batch_format="numpy",
                         fn_constructor_args=(cfg, generator, target.schema, pinned),
                         compute=ray.data.ActorPoolStrategy(size=s.num_actors), num_gpus=s.num_gpus)
        )
    summary = base.write_stage(st, f"{NAME}:{generator}", pipeline, [target], rows_per_commit=s.rows_per_commit,
                                skipped=skipped, overwritten=sum(m.rows for m in overwritten))
    report = ReconstructReport(**summary.__dict__, metrics=evaluate(cfg, generator))
    _log(cfg, report)
    return report


def select(cfg: Config) -> tuple[Maps, Callable[[], object]]:
    """The maps the config selects (featinv.sampling.split / variants / limit): stored ones, or a mapping
    run's mapped ones (featinv.sampling.mapping_run); and how to read them as a Ray Dataset."""
    from featmap_ray.stages.mapped import mapped_features, mapped_pairs, run_identity

    request, layer = data.featinv_backbone(cfg)
    st = tables.Store(cfg.storage)
    s = cfg.featinv.sampling
    if s.mapping_run is not None:
        split = s.split or "test"
        run_dir, info, pairs = mapped_pairs(cfg, s.mapping_run, split)
        manipulation = info["spec"]["manipulation"]
        maps = Maps(f"mapped:{s.mapping_run}", [(sid, manipulation) for sid in pairs.source_ids][: s.limit],
                    {manipulation: [tables.ORIGINAL, manipulation]},  # the run maps the originals
                    {"mapping run": run_identity(run_dir, info)})
        return maps, lambda: mapped_features(run_dir, pairs, split)
    uri = st.layout.features(request.name, layer)
    where = data.selection(s.split, s.variants)
    keys = sorted(st.keys(uri, filter=where))[: s.limit]
    if not keys:
        raise FileNotFoundError(f"no feature maps in {uri}" + (f" where {where}" if where else "")
                                + ": run `featmap extract` first (or check featinv.sampling.split / variants)")
    maps = Maps(EXTRACTED, keys, {variant: [variant] for variant in {v for _, v in keys}})
    return maps, lambda: base.read_ray(uri, columns=[*LABELS, "feature"], filter=where)


def run(cfg: Config) -> ReconstructReport:
    """Reconstruct the maps the config selects (`select`)."""
    maps, dataset = select(cfg)
    return reconstruct_dataset(cfg, dataset(), maps)


def status(cfg: Config) -> list[base.OutputStatus]:
    """The reconstructions of the maps the config selects: missing, stale (another FeatInv model, sampler
    setting or input), partial (keys × seeds not all stored) or up to date."""
    request, layer = data.featinv_backbone(cfg)
    uri = tables.Store(cfg.storage).layout.reconstructions(request.name, layer)
    try:
        maps, _ = select(cfg)
    except (FileNotFoundError, ValueError) as e:  # nothing to reconstruct yet
        return [base.OutputStatus(NAME, uri, "missing", str(e))]
    per_variant = collections.Counter(variant for _, variant in maps.keys)
    expected = {f"{maps.generator}/{variant}": n * cfg.featinv.sampling.num_samples
                for variant, n in per_variant.items()}
    return [base.table_status(NAME, uri, maps.groups(cfg, identity.model_identity(cfg)), expected)]


STAGE = base.Stage(
    "reconstruct", "feature maps -> FeatInv reconstructions, with metrics", run,
    details="Samples images from the stored feature maps (or from a mapping run's mapped maps: "
            "featinv.sampling.mapping_run) into reconstructions/<backbone>/<layer>.lance.",
    keys=(*base.RAY_KEYS, *FEATINV_KEYS), checks=(data.check_featinv,), reads=("features", "featinv", "runs"),
    writes=("reconstructions", "errors"), shows_runs_page=True, status=status)
