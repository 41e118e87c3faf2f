"""`featmap evaluate`: every finished mapping run of a study, and the identity and spatial-only baselines,
on the held-out split: feature metrics at the mapped layer and classifier agreement (the backbone's
remaining stages and head on original, edited and mapped features). One Ray task per (dataset,
backbone, layer, manipulation), so the test pairs and the classifier are loaded once for all the
models that share them.

Results are Lance tables under <storage>/results/<study>/, replaced as a whole by each run of a
stage (a new table version, so a reader never sees half of one); each records the digests of the
runs it was computed from (`RUNS`). A stage refuses, before any work, when a run is stale
(`base.run_staleness`: fitted on features that changed since, or recording no provenance).
"""


from __future__ import annotations

import json
import logging
from collections import defaultdict
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from featmap_ray.config import Config
from featmap_ray.io import tables, tracking
from featmap_ray.layout import Layout
from featmap_ray.stages import base

log = logging.getLogger(__name__)

BASELINES = ("identity", "spatial_only")
# A results table's schema metadata key: {run key: digest} of the mapping runs its rows were computed
# from, so `report` and `featmap status` can tell results of runs that changed since.
RUNS = "featmap:runs"


def results_uri(cfg: Config, name: str) -> str:
    return Layout(cfg.storage).results(cfg.mapping.study, name)


def write_results(cfg: Config, name: str, frame: pd.DataFrame, digests: dict[str, str]) -> str:
    """Replace the results table `name` with `frame`, recording in its schema metadata (`RUNS`) the
    digest of each mapping run its rows were computed from (those of `digests`, run key -> digest,
    that its `run` column names)."""
    import lance

    uri = results_uri(cfg, name)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    used = {key: digest for key, digest in digests.items() if key in set(frame["run"])}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), RUNS.encode(): json.dumps(used).encode()})
    lance.write_dataset(table, uri, mode="overwrite")
    return uri


def results_staleness(cfg: Config, name: str) -> list[str] | None:
    """Why the results table `name` no longer describes the study's runs: each run it was computed from
    that is no longer published, was retrained since (another digest) or is stale now
    (`base.run_staleness`); [] when it is up to date, None when there is no such table."""
    from featmap_ray.mapping.artefacts import read_info

    table = tables.open_table(results_uri(cfg, name))
    if table is None:
        return None
    recorded = (table.schema.metadata or {}).get(RUNS.encode())
    if recorded is None:
        return ["the runs it was computed from are not recorded (made by an older featmap-ray)"]
    layout, by_table, out = Layout(cfg.storage), {}, []
    for key, digest in sorted(json.loads(recorded).items()):
        info = read_info(layout.run(cfg.mapping.study, key))
        if info is None:
            out.append(f"run {key}: no longer published")
        elif info.get("digest") != digest:
            out.append(f"run {key}: retrained since")
        else:
            out += [f"run {key}: {reason}" for reason in base.run_staleness(cfg.storage, info, by_table)]
    return out


def results_status(cfg: Config, stage: str, names: tuple[str, ...]) -> list[base.OutputStatus]:
    """The results tables `names` of `stage`, for `featmap status` (`results_staleness`)."""
    out = []
    for name in names:
        uri, reasons = results_uri(cfg, name), results_staleness(cfg, name)
        if reasons is None:
            out.append(base.OutputStatus(stage, uri, "missing"))
        elif reasons:
            out.append(base.OutputStatus(stage, uri, "stale", f"computed from runs that changed: {'; '.join(reasons[:3])}"
                                                              + (f" and {len(reasons) - 3} more" if len(reasons) > 3 else "")))
        else:
            out.append(base.OutputStatus(stage, uri, "up to date", f"{tables.open_table(uri).count_rows()} rows"))
    return out


def check_runs(cfg: Config) -> None:
    """Before any work: no finished run of the study is stale (`base.refuse_stale_runs`)."""
    from featmap_ray.mapping.artefacts import finished_runs

    base.refuse_stale_runs(cfg.storage, finished_runs(cfg))


def status(cfg: Config) -> list[base.OutputStatus]:
    return results_status(cfg, "evaluate", ("evaluations",))


def read_results(cfg: Config, name: str) -> pd.DataFrame:
    table = tables.open_table(results_uri(cfg, name))
    if table is None:
        raise FileNotFoundError(f"no {name} results at {results_uri(cfg, name)}: run the stage that makes them first")
    return table.to_table().to_pandas()


def _test_tensors(cfg: Config, dataset: str, backbone: str, layer: str, manipulation: str):
    """(x, y, labels) of the held-out pairs, a seeded subset of at most evaluate.max_pairs."""
    from featmap_ray.stages import pairs as data

    pairs = data.load_pairs(tables.Store(cfg.storage), dataset=dataset, backbone=backbone, layer=layer,
                            manipulation=manipulation, split=cfg.evaluate.split)
    if len(pairs) == 0:
        raise ValueError(f"no {cfg.evaluate.split} pairs (original + {manipulation!r}) of {dataset!r} in {pairs.uri}")
    pairs = data.sample(pairs, cfg.evaluate.max_pairs, cfg.evaluate.seed)
    x, y = (a.astype(np.float32) for a in pairs.read(np.arange(len(pairs))))
    for name, t in (("original", x), ("manipulated", y)):
        if not np.isfinite(t).all():
            raise ValueError(f"non-finite values in the {cfg.evaluate.split} {name} feature maps of {backbone}/{layer}")
    return torch.from_numpy(x), torch.from_numpy(y), pairs.class_idx


def task_device() -> torch.device:
    """Where a Ray task computes: cuda when Ray gave it a GPU (`ray.get_gpu_ids()` non-empty; Ray
    sets CUDA_VISIBLE_DEVICES to it, so "cuda" is that GPU) and torch can use it, else cpu."""
    import ray

    gpus = ray.get_gpu_ids() if ray.is_initialized() else []
    return torch.device("cuda" if gpus and torch.cuda.is_available() else "cpu")


def score_models(models: list[tuple[dict[str, Any], torch.nn.Module]], x: torch.Tensor, y: torch.Tensor,
                 labels, tail: torch.nn.Module | None, batch_size: int,
                 device: torch.device | str = "cpu") -> list[dict[str, Any]]:
    """One row per (meta, model): meta, the feature metrics of model(x) against y (mean over
    pairs) and, with a classifier `tail`, the probability metrics of the original, edited and
    mapped maps. Models and tail are moved to `device`, the (CPU) pairs one batch at a time;
    results come back to the CPU, and each model leaves the device when it is done."""
    from featmap_ray.evaluation.classifier import probability_metrics
    from featmap_ray.evaluation.feature_metrics import feature_metrics, summarise

    def batches():
        for i in range(0, len(x), batch_size):
            yield x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)

    def probs(t: torch.Tensor) -> torch.Tensor:
        return tail(t).softmax(-1).cpu()

    rows = []
    with torch.no_grad():
        if tail is not None:
            tail.to(device)
            p_orig, p_edit = zip(*((probs(xb), probs(yb)) for xb, yb in batches()), strict=True)
            p_orig, p_edit = torch.cat(p_orig).numpy(), torch.cat(p_edit).numpy()
        for meta, model in models:
            model.to(device)
            per_sample, p_mapped = defaultdict(list), []
            for xb, yb in batches():
                mapped = model(xb)
                for name, values in feature_metrics(mapped, yb).items():
                    per_sample[name].append(values)
                if tail is not None:
                    p_mapped.append(probs(mapped))
            model.to("cpu")
            row = {**meta, **summarise({name: np.concatenate(v) for name, v in per_sample.items()})}
            if tail is not None:
                row.update(probability_metrics(p_orig, p_edit, torch.cat(p_mapped).numpy(), labels))
            rows.append(row)
    return rows


def _evaluate_group(cfg: Config, group: tuple[str, str, str, str], run_dirs: list[str]) -> list[dict[str, Any]]:
    """Every model of one (dataset, backbone, layer, manipulation) on the same held-out pairs, on
    the GPU when the task was given one."""
    from featmap_ray import backbones
    from featmap_ray.evaluation.classifier import ClassifierUnavailable, classifier_request, classifier_tail
    from featmap_ray.mapping.artefacts import load_run
    from featmap_ray.mapping.models import build_model, is_geometric

    dataset, backbone, layer, manipulation = group
    device = task_device()
    x, y, labels = _test_tensors(cfg, dataset, backbone, layer, manipulation)
    models: list[tuple[dict[str, Any], torch.nn.Module]] = []
    for d in run_dirs:
        model, spec, info = load_run(d)
        models.append(({"run": spec.key, "group": spec.group, "model": spec.model, "loss": spec.loss_name,
                        "mlflow_run_id": info.get("mlflow_run_id", "")}, model))
    c, h, w = x.shape[1:]
    for name in BASELINES:
        if name == "spatial_only" and not is_geometric(manipulation):
            continue
        models.append(({"run": f"{dataset}--baseline--{backbone}--{layer}--{manipulation}--{name}", "group": "baseline",
                        "model": name, "loss": "", "mlflow_run_id": ""},
                       build_model(name, c, h, w, manipulation=manipulation).eval()))

    spec = backbones.get_spec(backbone)
    try:
        tail = classifier_tail(backbones.build_model(spec, classifier_request(cfg, backbone), device), spec, layer)
    except ClassifierUnavailable as e:
        log.warning("%s/%s: no classifier agreement: %s", backbone, layer, e)
        tail = None
    rows = score_models(models, x, y, labels, tail, cfg.evaluate.batch_size, device)
    return [{"dataset": dataset, "backbone": backbone, "layer": layer, "manipulation": manipulation, **row}
            for row in rows]


def run_evaluate(cfg: Config) -> pd.DataFrame:
    import ray

    from featmap_ray.mapping.artefacts import finished_runs, read_info
    from featmap_ray.mapping.grid import RunSpec

    runs = finished_runs(cfg)
    base.refuse_stale_runs(cfg.storage, runs)
    groups: dict[tuple[str, str, str, str], list[str]] = defaultdict(list)
    digests = {}
    for d in runs:
        info = read_info(d)
        spec = RunSpec.from_dict(info["spec"])
        digests[spec.key] = info["digest"]
        groups[(spec.dataset, spec.backbone, spec.layer, spec.manipulation)].append(str(d))
    if not groups:
        raise ValueError(f"study {cfg.mapping.study!r} has no finished mapping runs: run `featmap fit` first")
    features = sorted({tables.Store(cfg.storage).layout.features(b, l) for _, b, l, _ in groups})
    with tracking.study_stage(cfg, "evaluate", tracking.table_inputs(cfg, features), context="evaluation") as run_id:
        task = ray.remote(_evaluate_group).options(num_cpus=1, num_gpus=cfg.mapping.resources.gpus_per_worker)
        refs = {g: task.remote(cfg, g, dirs) for g, dirs in sorted(groups.items())}
        rows, failed = [], {}
        for g, ref in refs.items():
            try:
                rows += ray.get(ref)
            except Exception as e:  # one unusable group (e.g. no test pairs) does not stop the others
                failed["/".join(g)] = str(e).strip().splitlines()[-1]
        for g, msg in failed.items():
            log.error("evaluate %s failed: %s", g, msg)
        if not rows:
            message = f"evaluation produced no results; failures: {failed}"
            tracking.end_stage_run(cfg, run_id, {"groups": len(groups), "failed_groups": len(failed)}, status="FAILED",
                                   error=message)
            raise ValueError(message)
        frame = pd.DataFrame(rows)
        frame["family"] = frame["manipulation"].map(_families(cfg)).fillna("unknown")
        write_results(cfg, "evaluations", frame, digests)
        _log_run_metrics(cfg, frame)
        tracking.end_stage_run(cfg, run_id, {"rows": len(frame), "groups": len(groups), "failed_groups": len(failed)})
    return frame


def _log_run_metrics(cfg: Config, frame: pd.DataFrame) -> None:
    """Each mapping run's held-out metrics on its own MLflow run (eval_ prefix); baselines have no
    MLflow run and live in the evaluations table only."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking.tracking_uri(cfg))
    numeric = frame.select_dtypes("number").columns
    for _, row in frame[frame["mlflow_run_id"] != ""].iterrows():
        tracking.log_metrics(client, row["mlflow_run_id"],
                             {f"eval_{k}": row[k] for k in numeric if np.isfinite(row[k])})


def _families(cfg: Config) -> dict[str, str]:
    """manipulation -> family (geometric, photometric, mask, semantic) as recorded in the images table."""
    st = tables.Store(cfg.storage)
    rows = st.open(st.layout.images).to_table(columns=["variant", "family"],
                                           filter=f"variant != '{tables.ORIGINAL}'").to_pandas()
    return dict(zip(rows["variant"], rows["family"], strict=True))


EVALUATE_KEYS = ("evaluate", "evaluate.classifier", "mapping.study", "mapping.resources.gpus_per_worker")


def check_grid(cfg: Config) -> None:
    """The mapping section expands to a grid (families, losses, targets), tables not consulted."""
    from featmap_ray.mapping import grid

    grid.expand(cfg)


def command(cfg: Config) -> str:
    frame = run_evaluate(cfg)
    cols = [c for c in ("backbone", "layer", "manipulation", "model", "cos_median_upper", "mse", "agree_top1_orig_mapped")
            if c in frame]
    return f"[evaluate] {len(frame)} rows in {results_uri(cfg, 'evaluations')}\n" + frame[cols].to_string(index=False)


STAGE = base.Stage(
    "evaluate", "held-out metrics of every finished mapping run, and the baselines", command,
    details="Feature metrics and classifier agreement of each run of the study, plus the identity and "
            "spatial-only baselines, in <storage>/results/<study>/evaluations.",
    keys=(*base.RAY_KEYS, *EVALUATE_KEYS), checks=(check_grid, check_runs), reads=("runs", "features"),
    writes=("results",), shows_runs_page=True, status=status)
