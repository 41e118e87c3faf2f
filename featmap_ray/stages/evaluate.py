"""The Ray stages behind `featmap evaluate`, `featmap analyze` and `featmap report`.

evaluate  every finished mapping run of a study, and the identity and spatial-only baselines, on
          the held-out split: feature metrics at the mapped layer and classifier agreement (the
          backbone's remaining stages and head on original, edited and mapped features). One Ray
          task per (dataset, backbone, layer, manipulation), so the test pairs and the classifier
          are loaded once for all the models that share them.
analyze   every shared affine map (linear, ridge, Procrustes): weight-vs-bias measures on held-out
          originals, SVD measures and singular values, and rank-k truncations of W evaluated like
          the full map (does the edit live in the leading singular components?), each with its own
          intercept b_k = ȳ − W_k x̄ from the run's training means (k = 0 predicts ȳ).
report    tables and PNG plots from both, in <storage>/reports/<study>/ and in MLflow.

Results are Lance tables under <storage>/results/<study>/, replaced as a whole by each run of a
stage (a new table version, so a reader never sees half of one).
"""

from __future__ import annotations

import logging
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from featmap_ray.config import BackboneRequest, Config
from featmap_ray.io import imageio, tables, tracking
from featmap_ray.io.files import Location
from featmap_ray.layout import Layout

log = logging.getLogger(__name__)

BASELINES = ("identity", "spatial_only")


def results_uri(cfg: Config, name: str) -> str:
    return Layout(cfg.storage).results(cfg.mapping.study, name)


def reports_dir(cfg: Config) -> Location:
    return Location(cfg.storage) / "reports" / cfg.mapping.study


def write_results(cfg: Config, name: str, frame: pd.DataFrame) -> str:
    import lance

    uri = results_uri(cfg, name)
    lance.write_dataset(pa.Table.from_pandas(frame, preserve_index=False), uri, mode="overwrite")
    return uri


def read_results(cfg: Config, name: str) -> pd.DataFrame:
    table = tables.open_table(results_uri(cfg, name))
    if table is None:
        raise FileNotFoundError(f"no {name} results at {results_uri(cfg, name)}: run the stage that makes them first")
    return table.to_table().to_pandas()


def classifier_request(cfg: Config, backbone: str) -> BackboneRequest:
    """The classifier for a backbone's features: evaluate.classifier, else the extracted backbone."""
    if cfg.evaluate.classifier is not None and cfg.evaluate.classifier.name == backbone:
        return cfg.evaluate.classifier
    for request in cfg.extract.backbones:
        if request.name == backbone:
            return request
    return BackboneRequest(name=backbone)


def _test_tensors(cfg: Config, dataset: str, backbone: str, layer: str, manipulation: str):
    """(x, y, labels) of the held-out pairs, a seeded subset of at most evaluate.max_pairs."""
    from featmap_ray.mapping import data

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
    from featmap_ray.evaluation.classifier import ClassifierUnavailable, classifier_tail
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

    from featmap_ray.mapping.artefacts import finished_runs, load_run

    groups: dict[tuple[str, str, str, str], list[str]] = defaultdict(list)
    for d in finished_runs(cfg):
        _, spec, _ = load_run(d)
        groups[(spec.dataset, spec.backbone, spec.layer, spec.manipulation)].append(str(d))
    if not groups:
        raise ValueError(f"study {cfg.mapping.study!r} has no finished mapping runs: run `featmap fit` first")
    features = sorted({tables.Store(cfg.storage).layout.features(b, l) for _, b, l, _ in groups})
    run_id = tracking.study_stage_run(cfg, "evaluate", tracking.table_inputs(cfg, features), context="evaluation")
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
    write_results(cfg, "evaluations", frame)
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


# -- linear-map analysis --------------------------------------------------------------------------

def raw_affine(model) -> tuple[np.ndarray, np.ndarray] | None:
    """(W, b) of a shared affine run in raw feature space: with normalisation x' = (x - mu)/s,
    y = s * (W x' + b) + mu, so W_raw = diag(s) W diag(1/s) and b_raw = s*b + mu - W_raw mu."""
    from featmap_ray.mapping.models import linear_weights

    weights = linear_weights(model.inner)
    if weights is None:
        return None
    w, b = (t.double().numpy() for t in weights)
    if model.normalised:
        s, mu = model.std.double().flatten().numpy(), model.mean.double().flatten().numpy()
        w = s[:, None] * w / s[None, :]
        b = s * b + mu - w @ mu
    return w, b


def train_means(info: dict[str, Any], run: str) -> tuple[np.ndarray, np.ndarray]:
    """(x̄, ȳ): the per-channel means of a run's training inputs and targets in raw feature space,
    from its run.json (`info["train_means"]`)."""
    means = info.get("train_means")
    if not isinstance(means, dict) or not {"x", "y"} <= means.keys():
        raise ValueError(f"mapping run {run}: its run.json has no train_means (the per-channel means of the "
                         "training inputs and targets, which the rank-k truncations' intercept b_k = ȳ − W_k x̄ "
                         "needs); it was fitted by an older version: re-fit it (`featmap fit`)")
    return np.asarray(means["x"], dtype=np.float64), np.asarray(means["y"], dtype=np.float64)


def _analyze_run(cfg: Config, run_dir: str) -> dict[str, list[dict[str, Any]]]:
    from featmap_ray.evaluation.feature_metrics import feature_metrics, summarise
    from featmap_ray.evaluation.linear_analysis import (
        singular_values,
        svd_metrics,
        truncated_affine,
        weight_bias_per_sample,
    )
    from featmap_ray.mapping.artefacts import load_run
    from featmap_ray.mapping.models import linear_weights, model_input

    model, spec, info = load_run(run_dir)
    affine = raw_affine(model)
    if affine is None:
        return {}
    x_mean, y_mean = train_means(info, f"{spec.key} ({run_dir})")
    w, b = affine
    # The precision the weights were stored in (raw_affine works in float64): the rank tolerance.
    weights_dtype = linear_weights(model.inner)[0].numpy().dtype
    base = {"run": spec.key, "dataset": spec.dataset, "group": spec.group, "backbone": spec.backbone,
            "layer": spec.layer, "manipulation": spec.manipulation, "model": spec.model}
    x, y, _ = _test_tensors(cfg, spec.dataset, spec.backbone, spec.layer, spec.manipulation)
    # What W sees: for the geometric "apply" group, the exactly rotated/flipped input.
    seen = model_input(model.inner, x).double().numpy()
    rng = np.random.default_rng(cfg.evaluate.seed)
    sample = seen[np.sort(rng.permutation(len(seen))[:cfg.evaluate.analysis_samples])]
    wxb = weight_bias_per_sample(w, b, sample)
    wxb_rows = [{**base, "sample": i, "metric": m, "value": float(v)}
                for i, r in wxb.reset_index(drop=True).iterrows() for m, v in r.items()]

    s = singular_values(w)
    ranks = sorted({k for k in cfg.evaluate.truncation_ranks if k < len(s)} | {len(s)})
    truncation = []
    for k in ranks:
        wk, bk = truncated_affine(w, k, x_mean, y_mean)
        mapped = torch.from_numpy(np.einsum("oc,nchw->nohw", wk, seen) + bk[None, :, None, None]).float()
        truncation += [{**base, "k": k, "metric": m, "value": v} for m, v in summarise(feature_metrics(mapped, y)).items()
                       if m != "n_samples"]
    return {"svd": [{**base, **svd_metrics(w, weights_dtype=weights_dtype)}],
            "singular_values": [{**base, "index": i + 1, "value": float(v)} for i, v in enumerate(s)],
            "weight_bias": wxb_rows, "truncation": truncation}


def run_analyze(cfg: Config) -> dict[str, pd.DataFrame]:
    import ray

    from featmap_ray.mapping.artefacts import finished_runs

    runs = finished_runs(cfg)
    st = tables.Store(cfg.storage)
    run_id = tracking.study_stage_run(cfg, "analyze", [tracking.table_input(cfg, st.layout.images)], context="evaluation")
    task = ray.remote(_analyze_run).options(num_cpus=1)
    parts = ray.get([task.remote(cfg, str(d)) for d in runs])
    tables: dict[str, list] = defaultdict(list)
    for part in parts:
        for name, rows in part.items():
            tables[name] += rows
    if not tables:
        message = (f"study {cfg.mapping.study!r} has no finished linear, ridge or orthogonal_procrustes runs "
                   "to analyse")
        tracking.end_stage_run(cfg, run_id, {"runs": 0}, status="FAILED", error=message)
        raise ValueError(message)
    families = _families(cfg)
    frames = {}
    for name, rows in tables.items():
        frame = pd.DataFrame(rows)
        frame["family"] = frame["manipulation"].map(families).fillna("unknown")
        write_results(cfg, name, frame)
        frames[name] = frame
    svd = frames["svd"]  # one row per analysed run; the features tables its tasks read
    features = sorted({st.layout.features(b, l) for b, l in zip(svd["backbone"], svd["layer"], strict=True)})
    tracking.end_stage_run(cfg, run_id, {"runs": len(svd)}, inputs=tracking.table_inputs(cfg, features))
    return frames


def _families(cfg: Config) -> dict[str, str]:
    """manipulation -> family (geometric, photometric, mask, semantic) as recorded in the images table."""
    st = tables.Store(cfg.storage)
    rows = st.open(st.layout.images).to_table(columns=["variant", "family"],
                                           filter=f"variant != '{tables.ORIGINAL}'").to_pandas()
    return dict(zip(rows["variant"], rows["family"], strict=True))


# -- report ---------------------------------------------------------------------------------------

def run_report(cfg: Config) -> Location:
    """report.md and its figures in <storage>/reports/<study>/ (replaced as a whole) and in MLflow."""
    target = reports_dir(cfg)
    with target.staged() as out:
        n_figures = write_report(cfg, out)
        results = [results_uri(cfg, name) for name in ("evaluations", "svd", "singular_values", "weight_bias",
                                                        "truncation")]
        run_id = tracking.study_stage_run(cfg, "report", tracking.table_inputs(cfg, results), context="evaluation")
        tracking.end_stage_run(cfg, run_id, {"figures": n_figures}, artefacts=out)
    return target / "report.md"


def write_report(cfg: Config, out: Path) -> int:
    """report.md and its PNG figures in the local folder `out`; returns the number of figures."""
    from featmap_ray.evaluation import report

    evals = read_results(cfg, "evaluations")
    cosine = "cos_median_upper"  # the evaluation's median rule, that of the loss (feature_metrics)
    figures = {"Median cosine (upper) to the true edited features": report.family_heatmaps(evals, cosine, out)}
    tables = {f"{cosine} {b}/{l}": t for (b, l), t in report.family_tables(evals, cosine).items()}
    if "agree_top1_orig_mapped" in evals and evals["agree_top1_orig_mapped"].notna().any():
        figures["Top-1 agreement with the original's prediction"] = report.family_heatmaps(
            evals, "agree_top1_orig_mapped", out)
        tables.update({f"top-1 agreement {b}/{l}": t
                       for (b, l), t in report.family_tables(evals, "agree_top1_orig_mapped").items()})
    if tables.open_table(results_uri(cfg, "svd")) is not None:
        wxb = read_results(cfg, "weight_bias")
        figures["Singular-value spectra of the linear maps"] = report.spectra_plot(read_results(cfg, "singular_values"), out)
        figures["Weight vs bias by manipulation family"] = report.weight_bias_plot(wxb.assign(group=wxb["family"]), out)
        figures["Rank-k truncations of W"] = report.truncation_plot(read_results(cfg, "truncation"), out)
        tables["SVD measures"] = read_results(cfg, "svd").drop(columns=["run", "dataset"])
    if tables.open_table(results_uri(cfg, "reconstructions")) is not None:  # featmap recon-eval
        recon = read_results(cfg, "reconstructions")
        tables.update({f"Reconstructions: {metric} against the manipulated image (mean over sources)": t
                       for metric, t in report.recon_tables(recon).items()})
        st = tables.Store(cfg.storage)
        keys = set(zip(recon["source_id"], recon["variant"], strict=True))
        stored = st.rows(st.layout.images, keys, ["image"]).to_pylist()
        manipulated = {(r["source_id"], r["variant"]): imageio.decode_png_rgb(r["image"]) for r in stored}
        figures["Reconstructions: manipulated image, FeatInv of the true target, mapped, noise control, baseline"] = (
            report.recon_grids(recon, manipulated, out))
    figures.update(_featinv_viz_figures(cfg, out))
    report.write_summary(tables, out / "report.md", figures=figures, title=f"FeatMap study {cfg.mapping.study}")
    return sum(len(paths) for paths in figures.values())


def _featinv_viz_figures(cfg: Config, out: Path) -> dict[str, list[Path]]:
    """`featmap featinv-viz`'s files copied into the report (it rebuilds the report folder as a whole), and
    its grids as figures; nothing when the command has not run."""
    from featmap_ray.stages.featinv_viz import output_dir

    viz = output_dir(cfg)
    if not (viz / "results.json").exists():
        return {}
    with viz.local_copy() as local:
        shutil.copytree(local, out / "featinv_viz")
    base = out / "featinv_viz"
    return {
        "FeatInv-Viz: concept steering (source | reconstruction | attenuated | heat map | affected pixels)":
            sorted((base / "concepts").glob("*.png")),
        "FeatInv-Viz: interpolation of two feature maps, and the cosine of each map to its reconstruction":
            [base / "interpolation" / "strip.png", base / "interpolation" / "alpha_curve.png"],
        "FeatInv-Viz: spatial composition (B's region in A's map)": [base / "composition" / "grid.png"],
    }
