"""Fit a study: its runs in fused groups, one Ray Train run per group, Ray Tune scheduling the groups.

The grid's runs that read the same pairs (one dataset, backbone, layer, manipulation: the 8
families and the losses of the paper's grid) form a group (`grid.fused_groups`), trained by one
TorchTrainer that reads each batch once and steps every model (`train.fit_group`). Tune runs as
many groups at once as the cluster holds (or `mapping.resources.max_concurrent`), retries a
group whose driver died (`max_failures`, resuming from its last checkpoint), and records each
run's failure without stopping the others. A run whose folder holds a model with the same digest
is finished and skipped, so re-running a study after a crash trains only what is missing.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from featmap_ray.config import Config
from featmap_ray.io import tables, tracking
from featmap_ray.io.files import Location
from featmap_ray.mapping import artefacts, grid
from featmap_ray.stages import mapping_train as train


@dataclass
class StudySummary:
    study: str
    runs: int
    groups: int = 0
    fitted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def __str__(self) -> str:
        lines = [f"[fit] study {self.study}: {self.runs} runs; fitted {len(self.fitted)} in {self.groups} fused "
                 f"group(s), skipped as finished {len(self.skipped)}, failed {len(self.failed)} in {self.seconds:.0f} s"]
        lines += [f"  FAILED {key}: {msg.splitlines()[0][:300]}" for key, msg in self.failed.items()]
        if self.failed:
            lines.append("  (also in errors.lance, stage 'fit'; the MLflow runs are marked FAILED)")
        return "\n".join(lines)


def known_manipulations(st: tables.Store) -> set[str]:
    table = st.open(st.layout.images)
    if table is None:
        raise FileNotFoundError(f"no images table at {st.layout.images}: run `featmap ingest` and `manipulate` first")
    return set(table.to_table(columns=["variant"])["variant"].to_pylist()) - {tables.ORIGINAL}


def check_tables(st: tables.Store, runs: list[grid.RunSpec]) -> None:
    """Every (backbone, layer) a run needs has a features table: fail before any run starts."""
    missing = sorted({(r.backbone, r.layer) for r in runs if st.open(st.layout.features(r.backbone, r.layer)) is None})
    if missing:
        raise FileNotFoundError(f"no features table for {missing} under {st.root}/features: run `featmap extract` "
                                "with those backbones and layers first")


def validate_study(cfg: Config) -> list[grid.RunSpec]:
    """Every run of the study, checked against the tables (manipulations made, features
    extracted): raises, naming what is wrong, before any work. Needs no Ray."""
    st = tables.Store(cfg.storage)
    runs = grid.expand(cfg, known_manipulations(st))
    check_tables(st, runs)
    return runs


def trial_resources(cfg: Config) -> dict[str, float]:
    """The Tune trial only drives its TorchTrainer, whose workers ask for their own resources."""
    res = cfg.mapping.resources
    return {"cpu": res.driver_cpus, **res.driver_resources}


def max_concurrent(cfg: Config) -> int:
    """Groups at once: what the cluster holds, keeping a CPU free for Ray Data tasks (normalisation
    statistics)."""
    import ray

    res = cfg.mapping.resources
    if res.max_concurrent:
        return res.max_concurrent
    total = ray.cluster_resources()
    per_group_cpu = res.driver_cpus + res.num_workers * res.cpus_per_worker
    bound = int((total.get("CPU", 1) - 1) // per_group_cpu)
    gpus = res.gpus_per_worker * res.num_workers
    if gpus:
        bound = min(bound, int(total.get("GPU", 0) // gpus))
    return max(1, bound)


def tune_run_config(cfg: Config, kind: str, **kwargs):
    """A fresh, time-stamped Tune experiment under <storage>/mapping/tune (resumption is per group,
    through Ray Train checkpoints, so Tune's own experiment state is never restored)."""
    from ray import tune

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return tune.RunConfig(name=f"{cfg.mapping.study}-{kind}-{stamp}",
                          storage_path=str(Location(cfg.storage) / "mapping" / "tune"), verbose=0, **kwargs)


def plan_study(cfg: Config, runs: list[grid.RunSpec]) -> tuple[list[train.GroupPlan], list[str]]:
    """(groups with their pending runs, keys of finished runs). Groups are cut over all runs of a
    data key, pending or not, so a group keeps its name (and its checkpoints) across re-runs."""
    plans, done, norm_cache = [], [], {}
    suffix = train.refit_suffix() if cfg.mapping.refit else ""
    chunks = grid.fused_groups(runs, cfg.mapping.resources.models_per_group)  # a data key's chunks are adjacent
    for _, same_data in itertools.groupby(chunks, key=lambda chunk: chunk[0].data_key):
        same_data = list(same_data)
        for part, chunk in enumerate(same_data):
            plan = train.plan_group(cfg, chunk, part=part if len(same_data) > 1 else None, norm_cache=norm_cache)
            plan.name += suffix
            pending = []
            for run in plan.runs:
                published = artefacts.read_info(run.out_dir) or {}
                finished = published.get("digest") == run.digest and not cfg.mapping.refit
                (done.append(run.key) if finished else pending.append(run))
            if pending:
                plan.runs = pending
                plans.append(plan)
    return plans, done


def _trial(config: dict[str, Any], plans: list[train.GroupPlan], cfg_data: dict[str, Any], parent: str) -> None:
    from ray import tune

    from featmap_ray import runtime

    runtime.configure_data_context()
    cfg = Config.model_validate(cfg_data)
    result = train.fit_group(cfg, plans[config["group"]], mlflow_parent=parent)
    tune.report({"outcome": json.dumps(asdict(result))})


def run_study(cfg: Config) -> StudySummary:
    from ray import tune

    runs = validate_study(cfg)
    started = time.perf_counter()
    plans, done = plan_study(cfg, runs)
    summary = StudySummary(cfg.mapping.study, len(runs), len(plans), skipped=done)
    if not plans:
        return summary
    # The fit stage run, under the study's run; the mapping runs nest under it. Inputs: the
    # features tables at the versions the plans read.
    parent = tracking.study_stage_run(cfg, "fit", [tracking.table_input(cfg, p.train.uri, p.train.version)
                                                   for p in plans])
    trainable = tune.with_parameters(tune.with_resources(_trial, trial_resources(cfg)), plans=plans,
                                     cfg_data=cfg.model_dump(mode="json"), parent=parent)
    tuner = tune.Tuner(
        trainable,
        param_space={"group": tune.grid_search(list(range(len(plans))))},
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent(cfg)),
        run_config=tune_run_config(cfg, "fit",
                                   failure_config=tune.FailureConfig(max_failures=cfg.mapping.resources.max_failures)),
    )
    for result in tuner.fit():
        plan = plans[result.config["group"]]
        if result.error is not None:
            # The last line of a Ray task error is the exception that stopped the group.
            message = [line for line in str(result.error).splitlines() if line.strip()][-1]
            summary.failed.update({run.key: message for run in plan.runs})
            continue
        outcome = json.loads(result.metrics["outcome"])
        summary.fitted += outcome["fitted"]
        summary.failed.update(outcome["failed"])
    summary.seconds = time.perf_counter() - started
    _record_failures(cfg, summary)
    tracking.end_stage_run(cfg, parent, {"runs": len(runs), "groups": len(plans), "fitted": len(summary.fitted),
                                         "failed": len(summary.failed), "seconds": summary.seconds},
                           status="FAILED" if summary.failed and not summary.fitted else "FINISHED")
    return summary


def _record_failures(cfg: Config, summary: StudySummary) -> None:
    """Failed runs as rows of errors.lance (stage "fit", key = run key); runs that now succeeded
    are cleared from it."""
    st = tables.Store(cfg.storage)
    st.record_errors("fit", [{"key": key, "reason": "mapping run failed", "message": msg}
                             for key, msg in summary.failed.items()])
    if st.open(st.layout.errors) is not None:
        st.clear_errors("fit", summary.fitted)
