"""Fit a study: its runs in fused groups, one Ray Train run per group, Ray Tune scheduling the groups.

The grid's runs that read the same pairs (one dataset, backbone, layer, manipulation: the 8
families and the losses of the paper's grid) form a group (`grid.fused_groups`), trained by one
TorchTrainer that reads each batch once and steps every model (`train.fit_group`). Tune runs as
many groups at once as the cluster holds (or `mapping.resources.max_concurrent`), retries a
group whose driver died (`max_failures`, resuming from its last checkpoint), and records each
run's failure without stopping the others. A run whose folder holds a model with the same digest
is finished and skipped, so re-running a study after a crash trains only what is missing.

Provenance: each published run records its own settings and the fingerprints of the features
groups it read (run.json's `provenance`). A run whose input features changed since is retrained;
one whose own settings changed under the same key refuses before anything starts, unless
`--overwrite` (or `mapping.refit`) asks to retrain it.
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
from featmap_ray.layout import Layout
from featmap_ray.mapping import artefacts, grid
from featmap_ray.stages import base, runtime
from featmap_ray.stages import mapping_train as train

# Why a published run is trained again (besides mapping.refit, which retrains every run).
INPUTS_CHANGED = "input features changed"  # its features groups, pairs or normalisation statistics
SETTINGS_CHANGED = "settings changed, --overwrite"
NO_PROVENANCE = "no provenance recorded"  # fitted by an older featmap-ray
REVISION_CHANGED = "training procedure changed"  # grid.TRAINING_REVISION
RETRAINED = (INPUTS_CHANGED, SETTINGS_CHANGED, NO_PROVENANCE, REVISION_CHANGED)


@dataclass
class StudySummary:
    study: str
    runs: int
    groups: int = 0
    fitted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    retrained: dict[str, str] = field(default_factory=dict)  # published runs trained again: key -> why (RETRAINED)

    def __str__(self) -> str:
        why = [f"{sum(r == reason for r in self.retrained.values())} ({reason})" for reason in RETRAINED
               if reason in self.retrained.values()]
        lines = [f"[fit] study {self.study}: {self.runs} runs; fitted {len(self.fitted)} in {self.groups} fused "
                 f"group(s)" + (f", retrained {', '.join(why)}" if why else "") +
                 f", skipped as finished {len(self.skipped)}, failed {len(self.failed)} in {self.seconds:.0f} s"]
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
    extracted) and against its published run (`check_settings`): raises, naming what is wrong,
    before any work. Needs no Ray."""
    st = tables.Store(cfg.storage)
    runs = grid.expand(cfg, known_manipulations(st))
    check_tables(st, runs)
    check_settings(cfg, runs)
    return runs


def published_runs(cfg: Config, runs: list[grid.RunSpec]) -> dict[str, dict[str, Any]]:
    """{run key: its run.json} of the study's runs that are published."""
    infos = {spec.key: artefacts.read_info(artefacts.run_dir(cfg, spec)) for spec in runs}
    return {key: info for key, info in infos.items() if info is not None}


def changed_settings(cfg: Config, runs: list[grid.RunSpec], published: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """{run key: each of its own settings that differs, "setting: old -> new"} of the `published` runs
    (`published_runs`) whose recorded settings differ from what this config asks for under the same key."""
    training = train.training_settings(cfg)
    out = {}
    for spec in runs:
        recorded = published.get(spec.key, {}).get("provenance")
        if recorded is None:
            continue  # not published, or by an older featmap-ray: nothing to compare, it is (re)trained
        old = base.Provenance.from_json(recorded)
        # Against the recorded inputs: changed input features retrain a run, they never refuse one.
        changes = base.Provenance(train.run_settings(cfg, spec, training), old.inputs).changes(old)
        if changes:
            out[spec.key] = changes
    return out


def check_settings(cfg: Config, runs: list[grid.RunSpec]) -> None:
    """Refuse (ProvenanceMismatch), before anything is trained, when published runs of the study were
    trained with other settings under the same keys, unless `overwrite` (or `mapping.refit`) asks to
    retrain them."""
    if cfg.overwrite or cfg.mapping.refit:
        return
    changed = changed_settings(cfg, runs, published_runs(cfg, runs))
    if not changed:
        return
    lines = [(f"fit: {len(changed)} published run(s) of study {cfg.mapping.study!r} were trained with other "
              "settings; nothing was trained.")]
    by_change: dict[tuple[str, ...], list[str]] = {}
    for key, changes in changed.items():
        by_change.setdefault(tuple(changes), []).append(key)
    for changes, keys in by_change.items():
        lines.append(f"  {', '.join(keys[:4])}" + (f" and {len(keys) - 4} more" if len(keys) > 4 else "") + ":")
        lines += [f"    {change}" for change in changes]
    lines.append("Either use another study (mapping.study=...) or storage root (storage=...), or pass --overwrite "
                 "(overwrite=true) to retrain exactly these runs.")
    raise base.ProvenanceMismatch("\n".join(lines))


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


def trial_bar(desc: str, total: int | None, unit: str):
    """A Tune callback drawing one progress bar of finished trials in the driver (Tune itself runs
    with verbose=0); on a terminal only, like Ray Data's bars."""
    from ray import tune

    class TrialBar(tune.Callback):
        def __init__(self):
            self.bar = None  # made in setup: the run config (with its callbacks) is pickled before

        def setup(self, **info):
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, disable=None)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.bar.update(1)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.bar.update(1)

        def on_experiment_end(self, trials, **info):
            self.bar.close()

    return TrialBar()


def tune_run_config(cfg: Config, kind: str, bar: tuple[int | None, str] = (None, "trial"), **kwargs):
    """A fresh, time-stamped Tune experiment under <storage>/mapping/tune (resumption is per group,
    through Ray Train checkpoints, so Tune's own experiment state is never restored), with a
    progress bar of its trials (`bar`: their number if known, and what a trial is)."""
    from ray import tune

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return tune.RunConfig(name=f"{cfg.mapping.study}-{kind}-{stamp}",
                          storage_path=str(Layout(cfg.storage).mapping_tune), verbose=0,
                          callbacks=[trial_bar(f"{kind} {cfg.mapping.study}", *bar)], **kwargs)


def retrain_reason(root: str, plan: train.GroupPlan, run: train.PlannedRun, published: dict[str, Any]) -> str:
    """Why a published run whose digest differs from the planned one is trained again (`RETRAINED`)."""
    recorded = published.get("provenance")
    if recorded is None:
        return NO_PROVENANCE
    if base.Provenance(run.provenance.settings).changes(base.Provenance(recorded.get("settings", {}))):
        return SETTINGS_CHANGED
    if base.run_staleness(root, published) or published.get("data") != plan.data or published.get("norm") != run.norm:
        return INPUTS_CHANGED
    return REVISION_CHANGED


def plan_study(cfg: Config, runs: list[grid.RunSpec]) -> tuple[list[train.GroupPlan], list[str], dict[str, str]]:
    """(groups with their pending runs, keys of finished runs, {key: why} of published runs trained
    again). A published run is finished when its digest is the planned one: its settings, the
    provenance of its input features, its pairs and its normalisation are the same. Groups are cut
    over all runs of a data key, pending or not, so a group keeps its name (and its checkpoints)
    across re-runs."""
    plans, done, retrained, norm_cache = [], [], {}, {}
    suffix = train.refit_suffix() if cfg.mapping.refit else ""
    chunks = grid.fused_groups(runs, cfg.mapping.resources.models_per_group)  # a data key's chunks are adjacent
    for _, same_data in itertools.groupby(chunks, key=lambda chunk: chunk[0].data_key):
        same_data = list(same_data)
        for part, chunk in enumerate(same_data):
            plan = train.plan_group(cfg, chunk, part=part if len(same_data) > 1 else None, norm_cache=norm_cache)
            plan.name += suffix
            pending = []
            for run in plan.runs:
                published = artefacts.read_info(run.out_dir)
                if cfg.mapping.refit or published is None:
                    pending.append(run)
                elif published.get("digest") == run.digest:
                    done.append(run.key)
                else:
                    pending.append(run)
                    retrained[run.key] = retrain_reason(cfg.storage, plan, run, published)
            if pending:
                plan.runs = pending
                plans.append(plan)
    return plans, done, retrained


def _trial(config: dict[str, Any], plans: list[train.GroupPlan], cfg_data: dict[str, Any], parent: str) -> None:
    from ray import tune

    from featmap_ray.stages import runtime

    runtime.configure_data_context()
    cfg = Config.model_validate(cfg_data)
    result = train.fit_group(cfg, plans[config["group"]], mlflow_parent=parent)
    tune.report({"outcome": json.dumps(asdict(result))})


def run_study(cfg: Config) -> StudySummary:
    from ray import tune

    runs = validate_study(cfg)
    tables.Store(cfg.storage).check_errors_table()  # where failures go, before anything is trained
    started = time.perf_counter()
    plans, done, retrained = plan_study(cfg, runs)
    summary = StudySummary(cfg.mapping.study, len(runs), len(plans), skipped=done, retrained=retrained)
    if not plans:
        return summary
    # The fit stage run, under the study's run; the mapping runs nest under it. Inputs: the
    # features tables at the versions the plans read.
    with tracking.study_stage(cfg, "fit", [tracking.table_input(cfg, p.train.uri, p.train.version)
                                           for p in plans]) as parent:
        trainable = tune.with_parameters(tune.with_resources(_trial, trial_resources(cfg)), plans=plans,
                                         cfg_data=cfg.model_dump(mode="json"), parent=parent)
        runtime.start_autoscaling_coordinator()  # before the trials' Train controllers ask it
        tuner = tune.Tuner(
            trainable,
            param_space={"group": tune.grid_search(list(range(len(plans))))},
            tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent(cfg)),
            run_config=tune_run_config(cfg, "fit", bar=(len(plans), "group"),
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
    """Failed runs as rows of errors.lance (stage "fit", target = the study's runs folder, key = run
    key); runs that now succeeded are cleared from it."""
    st = tables.Store(cfg.storage)
    runs = st.layout.runs(cfg.mapping.study)
    st.record_errors("fit", str(runs), [{"key": key, "reason": "mapping run failed", "message": msg}
                                        for key, msg in summary.failed.items()])
    st.clear_errors("fit", str(runs), summary.fitted)


def status(cfg: Config) -> list[base.OutputStatus]:
    """The study's runs, for `featmap status`: missing (none published), stale (published runs whose
    input features changed since, whose own settings differ from this config's, or that record no
    provenance; the first named), partial (n of m runs finished) or up to date. Reads run.json and
    the features tables' provenance only (a change of the pairs themselves shows when `fit` plans)."""
    runs = grid.expand(cfg)
    where = str(Layout(cfg.storage).runs(cfg.mapping.study))
    published = published_runs(cfg, runs)
    finished = f"{len(published)} of {len(runs)} runs finished"
    if not published:
        return [base.OutputStatus("fit", where, "missing", finished)]
    by_table: dict[str, dict[str, str]] = {}
    stale = {key: base.run_staleness(cfg.storage, info, by_table) for key, info in published.items()}
    for key, changes in changed_settings(cfg, runs, published).items():
        stale[key] = changes + stale[key]
    stale = {key: reasons for key, reasons in stale.items() if reasons}
    if stale:
        key, reasons = next(iter(stale.items()))
        return [base.OutputStatus("fit", where, "stale", f"{len(stale)} run(s) ({finished}), e.g. {key}: "
                                                         f"{'; '.join(reasons[:3])}")]
    return [base.OutputStatus("fit", where, "partial" if len(published) < len(runs) else "up to date", finished)]


FIT_KEYS = ("mapping", "mapping.targets", "mapping.training", "mapping.resources", "manipulate.ops",
            "extract.backbones")


def command(cfg: Config) -> StudySummary:
    summary = run_study(cfg)
    if summary.failed and not summary.fitted and not summary.skipped:
        raise RuntimeError(f"every run of study {cfg.mapping.study} failed")
    return summary


STAGE = base.Stage(
    "fit", "train the study's pending mapping runs (Ray Tune schedules the grid)", command,
    details="Expands mapping.datasets x targets x losses into runs; finished runs are skipped, interrupted ones "
            "resume, runs whose input features changed are retrained. Runs land in "
            "<storage>/mapping/runs/<study>/.",
    keys=(*base.RAY_KEYS, *FIT_KEYS), checks=(validate_study,), reads=("features",), writes=("runs", "errors"),
    shows_runs_page=True, status=status)
