"""Ray job: mapping runs judged as images (FeatMap §7) — `featmap recon-eval`.

For each finished run of the study whose (backbone, layer) the FeatInv model inverts, on a seeded subset
of held-out sources (`evaluate.reconstruction.subset_size` per (dataset, manipulation), the same for every
model of a manipulation), FeatInv reconstructs from one seed: the true target map, the mapped map, the
spatial-only baseline (geometric manipulations) and the noise control (the original map plus noise of the
mapping's change norm at every position). Each reconstruction is scored against the manipulated image and
against the true target's reconstruction (`image_metrics`), in an actor pool that loads FeatInv and the
judge backbone once. Rows (run, source_id) are committed as they come; a re-run scores only what is missing.
Each run's rows are a group (stages.base) that records the FeatInv model, the sampler and scoring settings,
the run itself (digest and weights: a refit run is another) and the groups its pairs came from: rows made
otherwise refuse the run before anything is written, or with `overwrite` are scored again.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from featmap_ray.config import Config
from featmap_ray.evaluation import image_metrics
from featmap_ray.featinv import data, identity, metrics
from featmap_ray.io import imageio, tables, tracking
from featmap_ray.io.files import Location
from featmap_ray.mapping.artefacts import read_info
from featmap_ray.seeding import derive_seed
from featmap_ray.stages import base, runtime
from featmap_ray.stages.featinv_train import FEATINV_KEYS

NAME = "recon-eval"
RESULTS = "reconstructions"  # results/<study>/reconstructions.lance
KINDS = ("target", "mapped", "baseline", "noise")  # the maps FeatInv reconstructs per pair
# (reference image, reconstruction): "manip" is the real manipulated image, the others are reconstructions.
COMPARISONS = (("manip", "target"), ("manip", "mapped"), ("manip", "baseline"), ("manip", "noise"),
               ("target", "mapped"), ("target", "baseline"), ("target", "noise"))
METRICS = ("mse", "ssim", "psnr", "cos_median", "cos_median_masked")
LABELS = ("run", "source_id", "variant", "dataset", "split", "class_idx", "family", "backbone", "layer", "group",
          "model", "seed")


def metric_column(reference: str, kind: str, metric: str) -> str:
    return f"{reference}_vs_{kind}_{metric}"


def results_schema(lpips: bool) -> pa.Schema:
    metric_names = (*METRICS, "lpips") if lpips else METRICS
    return pa.schema(
        [tables.key_field("run"), tables.key_field("source_id"), pa.field("variant", pa.string()),
         pa.field("dataset", pa.string()), pa.field("split", pa.string()), pa.field("class_idx", pa.int32()),
         pa.field("family", pa.string()), pa.field("backbone", pa.string()), pa.field("layer", pa.string()),
         pa.field("group", pa.string()), pa.field("model", pa.string()), pa.field("seed", pa.int64()),
         *(pa.field(f"recon_{kind}", pa.binary()) for kind in KINDS),  # PNG; baseline/noise may be null
         pa.field("change_norm", pa.float64()),  # mean over positions of ‖mapped − original‖
         pa.field("mask_cells", pa.int32()),  # judge-grid cells in the changed region
         *(pa.field(metric_column(r, k, m), pa.float64()) for r, k in COMPARISONS for m in metric_names)])


class ReconEvaluator:
    """Ray Data actor: (run, source) tasks -> rows of reconstructions and their scores (or failure rows).
    `controlnet`: the ControlNet as the driver resolved it (None: featinv.controlnet)."""

    def __init__(self, cfg: Config, runs: dict[str, dict], schema: pa.Schema, controlnet: str | None = None):
        from featmap_ray.featinv import loading

        rc = cfg.evaluate.reconstruction
        self.device = runtime.actor_device(rc.num_gpus > 0)
        self.pipe = loading.featinv_pipeline(cfg, controlnet).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.judge = metrics.BackboneProbe(rc.judge, rc.judge_layer, self.device)
        self.lpips = image_metrics.lpips_metric(rc.lpips_weights) if rc.lpips_weights else None
        self.cfg, self.runs, self.schema = cfg, runs, tables.with_error_columns(schema)
        self.models: dict[str, torch.nn.Module] = {}
        self.store = tables.Store(cfg.storage)

    def _model(self, key: str) -> torch.nn.Module:
        from featmap_ray.mapping.artefacts import load_run

        if key not in self.models:
            self.models[key] = load_run(self.runs[key]["run_dir"])[0].eval()
        return self.models[key]

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        for key in sorted(set(batch["run"].to_pylist())):
            tasks = [t for t in batch.to_pylist() if t["run"] == key]
            try:
                out += self._score_run(key, tasks)
            except Exception as e:  # e.g. out of memory: these pairs fail, the job goes on
                out += [{**t, **tables.failure(type(e).__name__, f"recon-eval of {key} / {t['source_id']}: {e}")}
                        for t in tasks]
        return pa.Table.from_pylist(out, schema=self.schema)

    def _maps(self, key: str, tasks: list[dict]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The feature maps to reconstruct per kind, (N, C, H, W) float32, and the mapping's change norms."""
        from featmap_ray.mapping.models import build_model, is_geometric

        info = self.runs[key]
        x, y = info["pairs"].read(np.array([t["row"] for t in tasks]))
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        with torch.no_grad():
            mapped = self._model(key)(torch.from_numpy(x)).numpy()
        maps = {"target": y, "mapped": mapped}
        if is_geometric(info["manipulation"]):
            baseline = build_model("spatial_only", *x.shape[1:], manipulation=info["manipulation"]).eval()
            with torch.no_grad():
                maps["baseline"] = baseline(torch.from_numpy(x)).numpy()
        if self.cfg.evaluate.reconstruction.noise_control:
            rngs = [np.random.default_rng(derive_seed(self.cfg.evaluate.reconstruction.seed, key, t["source_id"]))
                    for t in tasks]
            # A non-finite original or mapped map has no noise control; the caller turns the pair into a failure row.
            finite = [np.isfinite(xi).all() and np.isfinite(mi).all() for xi, mi in zip(x, mapped, strict=True)]
            maps["noise"] = np.stack([image_metrics.noise_control(xi, mi, rng) if ok else np.full_like(xi, np.nan)
                                      for xi, mi, rng, ok in zip(x, mapped, rngs, finite, strict=True)])
        change = np.linalg.norm(mapped - x, axis=1).mean(axis=(1, 2))
        return maps, change

    def _score_run(self, key: str, tasks: list[dict]) -> list[dict]:
        from featmap_ray.featinv.pipeline import seeded_generators

        maps, change = self._maps(key, tasks)
        finite = np.all([np.isfinite(m.reshape(len(tasks), -1)).all(axis=1) for m in maps.values()], axis=0)
        rows = [{**t, **tables.failure("non_finite", f"recon-eval of {key} / {t['source_id']}: a feature map "
                                                    f"({', '.join(maps)}) has NaN or Inf values")}
                for t, ok in zip(tasks, finite, strict=True) if not ok]
        tasks = [t for t, ok in zip(tasks, finite, strict=True) if ok]
        if not tasks:
            return rows
        keep = np.flatnonzero(finite)
        kinds = list(maps)
        stacked = torch.from_numpy(np.concatenate([maps[k][keep] for k in kinds])).to(self.device)
        s = self.cfg.featinv.sampling
        # One seed for every map of a pair: the reconstructions differ only by their feature maps.
        images = self.pipe(stacked, seeded_generators([s.seed] * len(stacked)), num_inference_steps=s.steps,
                           guidance_scale=s.guidance, prompt=s.prompt, negative_prompt=s.negative_prompt,
                           controlnet_conditioning_scale=s.control_scale).images
        recon = {k: images[i * len(tasks):(i + 1) * len(tasks)] for i, k in enumerate(kinds)}
        variant = self.runs[key]["manipulation"]
        stored = self.store.rows(self.store.layout.images, [(t["source_id"], v) for t in tasks
                                                         for v in (tables.ORIGINAL, variant)], ["image", "family"])
        stored = {(r["source_id"], r["variant"]): r for r in stored.to_pylist()}
        for j, task in enumerate(tasks):
            original = imageio.decode_png_rgb(stored[task["source_id"], tables.ORIGINAL]["image"])
            manip = imageio.decode_png_rgb(stored[task["source_id"], variant]["image"])
            size = (manip.shape[1], manip.shape[0])
            # The reference compares at the manipulated image's size: reconstructions resized (PIL bicubic).
            pictures = {"manip": manip, **{k: image_metrics.resize_to(np.asarray(recon[k][j]), size) for k in kinds}}
            judged = dict(zip(pictures, self.judge.features(torch.from_numpy(np.stack(list(pictures.values())))),
                              strict=True))
            mask = image_metrics.change_mask(original, manip, tuple(judged["manip"].shape[-2:]))
            row = {**task, "family": stored[task["source_id"], variant]["family"], "change_norm": float(change[keep[j]]),
                   "mask_cells": int(mask.sum()),
                   **{f"recon_{k}": imageio.encode_png(recon[k][j]) for k in kinds}}
            for reference, kind in COMPARISONS:
                if kind not in pictures:
                    continue
                scores = image_metrics.compare(pictures[reference], pictures[kind], judged[reference], judged[kind],
                                               mask, self.lpips)
                row.update({metric_column(reference, kind, m): v for m, v in scores.items()})
            rows.append(row)
        return rows


def choose_sources(source_ids: list[str], n: int, seed: int, dataset: str, manipulation: str) -> np.ndarray:
    """Row indices of a seeded choice of min(n, all) held-out sources, the same for every run of a
    (dataset, manipulation): models are compared on the same images."""
    order = np.argsort(source_ids)
    if n >= len(order):
        return np.sort(order)
    rng = np.random.default_rng(derive_seed(seed, dataset, manipulation))
    return np.sort(order[rng.choice(len(order), n, replace=False)])


def plan(cfg: Config) -> dict[str, dict]:
    """The runs to evaluate, checked before any work: finished, of FeatInv's (backbone, layer), with held-out pairs."""
    from featmap_ray.mapping.artefacts import finished_runs, read_info
    from featmap_ray.mapping.grid import RunSpec
    from featmap_ray.stages import pairs as pair_data

    rc = cfg.evaluate.reconstruction
    request, layer = data.featinv_backbone(cfg)
    finished = {d.name: d for d in finished_runs(cfg)}
    if rc.runs is not None:
        unknown = sorted(set(rc.runs) - set(finished))
        if unknown:
            raise ValueError(f"evaluate.reconstruction.runs: {unknown} are not finished runs of study "
                             f"{cfg.mapping.study!r}; finished: {sorted(finished)[:10]}")
    st, runs = tables.Store(cfg.storage), {}
    for key in rc.runs if rc.runs is not None else sorted(finished):
        spec = RunSpec.from_dict(read_info(finished[key])["spec"])  # the spec only: models load in the actors
        if (spec.backbone, spec.layer) != (request.name, layer):
            if rc.runs is None:
                continue  # another layer's run: FeatInv cannot invert it
            raise ValueError(f"evaluate.reconstruction.runs: {key} maps {spec.backbone}/{spec.layer}, but the FeatInv "
                             f"model inverts {request.name}/{layer} (featinv.backbone / featinv.layer)")
        pairs = pair_data.load_pairs(st, dataset=spec.dataset, backbone=spec.backbone, layer=spec.layer,
                                     manipulation=spec.manipulation, split=cfg.evaluate.split)
        if len(pairs) == 0:
            raise ValueError(f"mapping run {key}: no {cfg.evaluate.split} pairs (evaluate.split) to reconstruct")
        rows = choose_sources(pairs.source_ids, rc.subset_size, rc.seed, spec.dataset, spec.manipulation)
        runs[key] = {"run_dir": str(finished[key]), "pairs": pairs, "rows": rows, "manipulation": spec.manipulation,
                     "labels": {"dataset": spec.dataset, "backbone": spec.backbone, "layer": spec.layer,
                                "group": spec.group, "model": spec.model}}
    base.refuse_stale_runs(cfg.storage, [info["run_dir"] for info in runs.values()])
    if not runs:
        raise ValueError(f"study {cfg.mapping.study!r} has no finished run of {request.name}/{layer}, the (backbone, "
                         f"layer) the FeatInv model inverts: run `featmap fit` first, or set featinv.backbone/layer")
    return runs


def groups(cfg: Config, runs: dict[str, dict], model: dict[str, str]) -> list[base.Group]:
    """One group per run (its rows: run = key) and what makes them: the FeatInv model (`model`:
    identity.model_identity) and sampler, the judge, LPIPS, the noise control, the run itself (a refit
    is another model), and the features and images groups its pairs come from."""
    from featmap_ray.stages.mapped import run_identity

    rc, st = cfg.evaluate.reconstruction, tables.Store(cfg.storage)
    lpips = rc.lpips_weights and f"{rc.lpips_weights} (content {identity.content_digest(rc.lpips_weights)})"
    settings = {**model, **identity.sampler_settings(cfg), "featinv.sampling.seed": cfg.featinv.sampling.seed,
                "evaluate.reconstruction.judge": rc.judge.model_dump(mode="json", exclude={"layers"}),
                "evaluate.reconstruction.judge_layer": rc.judge_layer, "evaluate.reconstruction.lpips_weights": lpips,
                "evaluate.reconstruction.noise_control": rc.noise_control, "evaluate.reconstruction.seed": rc.seed}
    out = []
    for key, info in runs.items():
        read = [tables.ORIGINAL, info["manipulation"]]
        inputs = {**base.input_fingerprints(cfg.storage, info["pairs"].uri, read),
                  **base.input_fingerprints(cfg.storage, st.layout.images, read)}
        run_dir = Location(info["run_dir"])
        made = {**settings, "mapping run": run_identity(run_dir, read_info(run_dir))}
        out.append(base.Group(key, base.Provenance(made, inputs), base.group_filter("run", key)))
    return out


def run(cfg: Config) -> base.StageSummary:
    """Score what is missing of every planned run; rows another setting made refuse the run before anything
    is written, or with `overwrite` are deleted and made again (`base.reconcile`)."""
    import ray.data

    from featmap_ray.stages.evaluate import results_uri

    rc = cfg.evaluate.reconstruction
    runs = plan(cfg)
    pinned = identity.pinned_controlnet(cfg)
    uri = results_uri(cfg, RESULTS)
    target = tables.Target(uri, results_schema(rc.lpips_weights is not None), key=("run", "source_id"))
    overwritten = base.reconcile(NAME, [(target, groups(cfg, runs, identity.model_identity(cfg, pinned)))],
                                 overwrite=cfg.overwrite)
    done = set()
    if (table := tables.open_table(uri)) is not None:
        keys = table.to_table(columns=["run", "source_id"])
        done = set(zip(keys["run"].to_pylist(), keys["source_id"].to_pylist(), strict=True))
    tasks = [{"run": key, "source_id": info["pairs"].source_ids[i], "variant": info["manipulation"],
              "split": cfg.evaluate.split, "class_idx": int(info["pairs"].class_idx[i]), "row": int(i),
              "seed": cfg.featinv.sampling.seed, **info["labels"]}
             for key, info in runs.items() for i in info["rows"] if (key, info["pairs"].source_ids[i]) not in done]
    total = sum(len(info["rows"]) for info in runs.values())
    st = tables.Store(cfg.storage)
    with tracking.study_stage(cfg, NAME, tracking.table_inputs(
            cfg, [st.layout.images, *(info["pairs"].uri for info in runs.values())]), context="evaluation") as run_id:
        ds = None
        if tasks:
            ds = (ray.data.from_items(tasks, override_num_blocks=max(1, -(-len(tasks) // rc.batch_size)))
                  .map_batches(ReconEvaluator, batch_size=rc.batch_size, batch_format="pyarrow",
                               fn_constructor_args=(cfg, runs, target.schema, pinned),
                               compute=ray.data.ActorPoolStrategy(size=rc.num_actors), num_gpus=rc.num_gpus))
        summary = base.write_stage(st, NAME, ds, [target], rows_per_commit=rc.rows_per_commit,
                                    skipped=total - len(tasks), overwritten=sum(m.rows for m in overwritten))
        tracking.end_stage_run(cfg, run_id, {"written": sum(summary.written.values()), "failed": summary.failed},
                               inputs=tracking.table_inputs(cfg, [uri]))
    return summary


def status(cfg: Config) -> list[base.OutputStatus]:
    """The study's reconstruction scores: missing, stale (another FeatInv model or setting, a refit run, changed
    inputs), partial (a run's subset not all scored) or up to date."""
    from featmap_ray.stages.evaluate import results_uri

    uri = results_uri(cfg, RESULTS)
    try:
        runs = plan(cfg)
    except (FileNotFoundError, ValueError) as e:  # no run to score yet, or stale runs
        return [base.OutputStatus(NAME, uri, "missing" if tables.open_table(uri) is None else "stale",
                                  str(e).splitlines()[0])]
    expected = {key: len(info["rows"]) for key, info in runs.items()}
    return [base.table_status(NAME, uri, groups(cfg, runs, identity.model_identity(cfg)), expected)]


def check_judge(cfg: Config) -> None:
    """The judge backbone (name, layer, weights), LPIPS's local weights, and the runs to evaluate: finished,
    of the FeatInv model's (backbone, layer), with held-out pairs."""
    from featmap_ray import backbones

    rc = cfg.evaluate.reconstruction
    spec = backbones.get_spec(rc.judge.name)
    backbones.resolve_layers(spec, [rc.judge_layer])
    backbones.check_weights(spec, rc.judge)
    if rc.lpips_weights:
        image_metrics.lpips_metric(rc.lpips_weights)
    plan(cfg)


STAGE = base.Stage(
    "recon-eval", "mapping runs judged as images, through FeatInv reconstructions", run,
    details="For each finished run of FeatInv's (backbone, layer), on a seeded subset of held-out sources: MSE, "
            "SSIM, PSNR and the judge backbone's (masked) median cosine of each reconstruction against the "
            "manipulated image and the true target's reconstruction, in <storage>/results/<study>/"
            "reconstructions.lance; `featmap report` shows them.",
    keys=(*base.RAY_KEYS, "evaluate.reconstruction", "evaluate.reconstruction.judge", "mapping.study",
          *FEATINV_KEYS),
    checks=(data.check_featinv, check_judge), reads=("runs", "features", "images", "featinv"),
    writes=("results", "errors"), shows_runs_page=True, status=status)
