"""`featmap analyze`: every shared affine map of a study (linear, ridge, Procrustes): weight-vs-bias
measures on held-out originals, SVD measures and singular values, and rank-k truncations of W
evaluated like the full map (does the edit live in the leading singular components?), each with its
own intercept b_k = ȳ − W_k x̄ from the run's training means (k = 0 predicts ȳ).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import pandas as pd
import torch

from featmap_ray.config import Config
from featmap_ray.io import tables, tracking
from featmap_ray.stages import base
from featmap_ray.stages.evaluate import (
    _families,
    _test_tensors,
    check_grid,
    check_runs,
    results_status,
    results_uri,
    write_results,
)

TABLES = ("svd", "singular_values", "weight_bias", "truncation")  # results/<study>/<name>.lance


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

    from featmap_ray.mapping.artefacts import finished_runs, read_info

    runs = finished_runs(cfg)
    base.refuse_stale_runs(cfg.storage, runs)
    digests = {d.name: read_info(d)["digest"] for d in runs}  # a run's folder is named by its key
    st = tables.Store(cfg.storage)
    with tracking.study_stage(cfg, "analyze", [tracking.table_input(cfg, st.layout.images)],
                              context="evaluation") as run_id:
        task = ray.remote(_analyze_run).options(num_cpus=1)
        parts = ray.get([task.remote(cfg, str(d)) for d in runs])
        parts_by_table: dict[str, list] = defaultdict(list)
        for part in parts:
            for name, rows in part.items():
                parts_by_table[name] += rows
        if not parts_by_table:
            message = (f"study {cfg.mapping.study!r} has no finished linear, ridge or orthogonal_procrustes runs "
                       "to analyse")
            tracking.end_stage_run(cfg, run_id, {"runs": 0}, status="FAILED", error=message)
            raise ValueError(message)
        families = _families(cfg)
        frames = {}
        for name, rows in parts_by_table.items():
            frame = pd.DataFrame(rows)
            frame["family"] = frame["manipulation"].map(families).fillna("unknown")
            write_results(cfg, name, frame, digests)
            frames[name] = frame
        svd = frames["svd"]  # one row per analysed run; the features tables its tasks read
        features = sorted({st.layout.features(b, l) for b, l in zip(svd["backbone"], svd["layer"], strict=True)})
        tracking.end_stage_run(cfg, run_id, {"runs": len(svd)}, inputs=tracking.table_inputs(cfg, features))
    return frames


def status(cfg: Config) -> list[base.OutputStatus]:
    return results_status(cfg, "analyze", TABLES)


def command(cfg: Config) -> str:
    frames = run_analyze(cfg)
    return "[analyze] " + ", ".join(f"{name}: {len(f)} rows in {results_uri(cfg, name)}" for name, f in frames.items())


STAGE = base.Stage(
    "analyze", "linear maps of the study: weight vs bias, SVD, rank-k truncations", command,
    keys=(*base.RAY_KEYS, "evaluate", "mapping.study"), checks=(check_grid, check_runs), reads=("runs", "features"),
    writes=("results",), shows_runs_page=True, status=status)
