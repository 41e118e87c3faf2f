"""Run a study's grid: every pending run a Ray Tune trial that fits one TorchTrainer.

Tune is the scheduler of the grid: it runs as many runs at once as the cluster holds (or
`mapping.resources.max_concurrent`), records each run's failure without stopping the others,
and streams each run's per-epoch metrics. A run whose folder holds a finished model is skipped,
so re-running a study after a crash finishes what is missing; an interrupted run resumes from
its last Ray Train checkpoint (same run name, same storage path).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featmap_ray import store, tracking
from featmap_ray.config import Config
from featmap_ray.mapping import grid
from featmap_ray.mapping.train import RUN_FILE, fit_run, run_dir



@dataclass
class StudySummary:
    study: str
    runs: int
    fitted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def __str__(self) -> str:
        lines = [f"[fit] study {self.study}: {self.runs} runs; fitted {len(self.fitted)}, skipped as finished "
                 f"{len(self.skipped)}, failed {len(self.failed)} in {self.seconds:.0f} s"]
        lines += [f"  FAILED {key}: {msg.splitlines()[0][:300]}" for key, msg in self.failed.items()]
        return "\n".join(lines)


def known_manipulations(st: store.Store) -> set[str]:
    table = st.open(st.images_uri)
    if table is None:
        raise FileNotFoundError(f"no images table at {st.images_uri}: run `featmap ingest` and `manipulate` first")
    return set(table.to_table(columns=["variant"])["variant"].to_pylist()) - {store.ORIGINAL}


def check_tables(st: store.Store, runs: list[grid.RunSpec]) -> None:
    """Every (backbone, layer) a run needs has a features table: fail before any run starts."""
    missing = sorted({(r.backbone, r.layer) for r in runs if st.open(st.features_uri(r.backbone, r.layer)) is None})
    if missing:
        raise FileNotFoundError(f"no features table for {missing} under {st.root}/features: run `featmap extract` "
                                "with those backbones and layers first")


def trial_resources(cfg: Config) -> dict[str, float]:
    return {"cpu": 0.5}  # the trial only drives its TorchTrainer, whose workers ask for their own


def max_concurrent(cfg: Config) -> int:
    """Runs at once: what the cluster holds, keeping a CPU free for Ray Data's read tasks (with
    every CPU held by trial drivers and workers, the data tasks never run)."""
    import ray

    res = cfg.mapping.resources
    if res.max_concurrent:
        return res.max_concurrent
    total = ray.cluster_resources()
    per_run_cpu = trial_resources(cfg)["cpu"] + res.num_workers * res.cpus_per_worker
    bound = int((total.get("CPU", 1) - 1) // per_run_cpu)
    gpus = res.gpus_per_worker * res.num_workers
    if gpus:
        bound = min(bound, int(total.get("GPU", 0) // gpus))
    return max(1, bound)


def tune_run_config(cfg: Config, kind: str, **kwargs):
    """A fresh, time-stamped Tune experiment under <storage>/mapping/tune (resumption is per run,
    through Ray Train checkpoints, so Tune's own experiment state is never restored)."""
    from ray import tune

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return tune.RunConfig(name=f"{cfg.mapping.study}-{kind}-{stamp}",
                          storage_path=str(Path(cfg.storage) / "mapping" / "tune"), verbose=0, **kwargs)


def _trial(config: dict[str, Any], cfg_data: dict[str, Any], parent: str) -> None:
    from ray.tune.integration.ray_train import TuneReportCallback

    from featmap_ray import runtime

    runtime.configure_data_context()
    cfg = Config.model_validate(cfg_data)
    fit_run(cfg, grid.RunSpec.from_dict(config["run"]), mlflow_parent=parent, callbacks=[TuneReportCallback()])


def pending_runs(cfg: Config, runs: list[grid.RunSpec]) -> tuple[list[grid.RunSpec], list[grid.RunSpec]]:
    """(to fit, finished): a run is finished when its folder holds a model of the same spec."""
    import json

    todo, done = [], []
    for run in runs:
        info = run_dir(cfg, run) / RUN_FILE
        same = info.exists() and json.loads(info.read_text()).get("digest") == run.digest()
        (done if same and not cfg.mapping.refit else todo).append(run)
    return todo, done


def prepare_statistics(cfg: Config, runs: list[grid.RunSpec]) -> None:
    """Normalisation statistics once per (dataset, backbone, layer), before the runs that share them."""
    from featmap_ray.mapping import data

    st = store.Store(cfg.storage)
    for dataset, backbone, layer in sorted({(r.dataset, r.backbone, r.layer) for r in runs if r.normalise}):
        data.cached_channel_stats(st, Path(cfg.storage) / "mapping", dataset=dataset, backbone=backbone, layer=layer)


def validate_study(cfg: Config) -> list[grid.RunSpec]:
    """Every run of the study, checked against the tables (manipulations made, features
    extracted): raises, naming what is wrong, before any work. Needs no Ray."""
    st = store.Store(cfg.storage)
    runs = grid.expand(cfg, known_manipulations(st))
    check_tables(st, runs)
    return runs


def run_study(cfg: Config) -> StudySummary:
    import time

    from ray import tune

    runs = validate_study(cfg)
    todo, done = pending_runs(cfg, runs)
    summary = StudySummary(cfg.mapping.study, len(runs), skipped=[r.key for r in done])
    if not todo:
        return summary
    started = time.perf_counter()
    prepare_statistics(cfg, todo)
    parent = tracking.study_run(cfg, "fit")
    trainable = tune.with_parameters(tune.with_resources(_trial, trial_resources(cfg)),
                                     cfg_data=cfg.model_dump(mode="json"), parent=parent)
    tuner = tune.Tuner(
        trainable,
        param_space={"run": tune.grid_search([r.to_dict() for r in todo])},
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent(cfg)),
        run_config=tune_run_config(cfg, "fit", failure_config=tune.FailureConfig(max_failures=0)),
    )
    results = tuner.fit()
    for result in results:
        key = grid.RunSpec.from_dict(result.config["run"]).key
        if result.error is not None:
            # The last line of a Ray task error is the exception that stopped the run.
            summary.failed[key] = [line for line in str(result.error).splitlines() if line.strip()][-1]
        else:
            summary.fitted.append(key)
    summary.seconds = time.perf_counter() - started
    tracking.end_study_run(cfg, parent, {"runs": len(runs), "fitted": len(summary.fitted),
                                         "failed": len(summary.failed), "seconds": summary.seconds})
    return summary
