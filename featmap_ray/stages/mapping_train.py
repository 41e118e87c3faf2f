"""A fused group of mapping runs on Ray Train: a thin TorchTrainer adapter over `loop.GroupFit`.

`plan_group` (driver) fixes what a group trains: its pairs (split by source image), the
normalisation statistics, each run's provenance (its settings and the features groups it reads,
recorded in run.json), digest and output folder. `fit_group` (driver; a Ray Tune
trial in a study) opens each run's MLflow run and fits one `TorchTrainer` whose workers run
`train_group`: every worker reads its shard of the pairs from Lance by offset, builds every
member model, resumes each from the latest Ray Train checkpoint when its digest matches, and
calls `GroupFit.epoch()` until every member has stopped or failed. Rank 0 logs each epoch to
the members' MLflow runs, publishes a member the moment it stops (its run folder, see
`artefacts`), and checkpoints the group.

Identity: the Ray Train run is named after the group's data (study, dataset, backbone, layer,
manipulation, data fingerprint), so re-running a killed study resumes it; inside, each model's
state is keyed by its digest, so a model whose settings changed starts from scratch while its
unchanged neighbours resume. `mapping.refit: true` starts a new Train run.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from featmap_ray.config import Config, MappingTraining
from featmap_ray.io import tables, tracking
from featmap_ray.io.files import Location
from featmap_ray.layout import Layout
from featmap_ray.mapping import artefacts, grid
from featmap_ray.mapping.grid import RunSpec, run_digest
from featmap_ray.stages import base
from featmap_ray.stages import pairs as data

GROUP_STATE = "group.pt"
# Ray Train's controller collects reports and checkpoints when it polls the workers (every 2 s by
# default), and a worker's report waits for that: with short epochs most of a run was waiting.
POLL_INTERVAL_S = "0.25"


@dataclass
class PlannedRun:
    spec: RunSpec
    digest: str
    training: MappingTraining
    norm: dict | None
    out_dir: str
    provenance: base.Provenance  # recorded in run.json: its settings and the features groups it reads
    mlflow_run_id: str | None = None

    @property
    def key(self) -> str:
        return self.spec.key


@dataclass
class GroupPlan:
    """What one Ray Train run trains: runs that read the same pairs."""

    name: str  # of the Ray Train run
    train: data.Pairs
    val: data.Pairs
    data: str  # data.fingerprint of the two splits
    runs: list[PlannedRun] = field(default_factory=list)

    @property
    def stream(self) -> MappingTraining:
        """The settings that shape the batches, shared by every run of the group."""
        return self.runs[0].training


@dataclass
class GroupResult:
    fitted: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def train_root(cfg: Config) -> Location:
    return Layout(cfg.storage).mapping_train


def training_settings(cfg: Config, overrides: dict[str, Any] | None = None) -> MappingTraining:
    unknown = sorted(set(overrides or {}) - set(MappingTraining.model_fields))
    if unknown:
        raise ValueError(f"unknown training setting(s) {unknown}; available: {sorted(MappingTraining.model_fields)}")
    return MappingTraining(**{**cfg.mapping.training.model_dump(), **(overrides or {})})


def run_settings(cfg: Config, spec: RunSpec, training: MappingTraining | None = None) -> dict[str, Any]:
    """`grid.run_settings` of `spec` under this config (with `training`, by default the config's)."""
    return grid.run_settings(spec, training=(training or training_settings(cfg)).model_dump(),
                             loss_options=cfg.mapping.loss_options, num_workers=cfg.mapping.resources.num_workers)


def features_inputs(cfg: Config, pairs: data.Pairs) -> dict[str, str]:
    """The provenance of the features groups `pairs` read (the originals and the manipulation), as the
    table version they come from records it: input key -> fingerprint (a group recording none is absent)."""
    return {base.input_key(cfg.storage, pairs.uri, group): fingerprint for group, fingerprint in pairs.groups.items()
            if fingerprint}


def plan_group(cfg: Config, specs: list[RunSpec], *, name: str | None = None, part: int | None = None,
               training: MappingTraining | None = None, out_dirs: list[Location] | None = None,
               norm_cache: dict | None = None) -> GroupPlan:
    """Pairs, normalisation and digests of runs that share (dataset, backbone, layer, manipulation).
    Reads only key columns and cached statistics (computes them through Ray Data when missing).
    The Ray Train run is `name`, by default the study, the data key and the data fingerprint (and
    `part` when the runs of one data key are split into several groups)."""
    training = training or training_settings(cfg)
    st = tables.Store(cfg.storage)
    key = specs[0].data_key
    dataset, backbone, layer, manipulation = key
    if any(s.data_key != key for s in specs):
        raise ValueError(f"runs {[s.key for s in specs]}: a group's runs must read the same pairs")
    pairs = data.load_pairs(st, dataset=dataset, backbone=backbone, layer=layer, manipulation=manipulation,
                            split="train")
    if len(pairs) == 0:
        raise ValueError(f"runs {[s.key for s in specs]}: no training pairs (original + {manipulation!r}) of "
                         f"dataset {dataset!r} in {pairs.uri}")
    pairs = data.sample(pairs, training.max_train_pairs, training.seed)
    train, val = data.train_val_split(pairs, training.val_fraction, training.seed)
    fingerprint = data.fingerprint(train, val)
    norm = None
    if any(s.normalise for s in specs):
        norm_cache = {} if norm_cache is None else norm_cache
        if key[:3] not in norm_cache:
            norm_cache[key[:3]] = data.cached_channel_stats(st, dataset=dataset, backbone=backbone,
                                                            layer=layer).to_json()
        norm = norm_cache[key[:3]]
    name = name or "--".join([cfg.mapping.study, *key, fingerprint[:8], *([f"part{part}"] if part is not None else [])])
    plan = GroupPlan(name, train, val, fingerprint)
    inputs = features_inputs(cfg, pairs)
    for i, spec in enumerate(specs):
        run_norm = norm if spec.normalise else None
        provenance = base.Provenance(run_settings(cfg, spec, training), inputs)
        digest = run_digest(provenance.settings, data=fingerprint, norm=run_norm)
        out_dir = out_dirs[i] if out_dirs else artefacts.run_dir(cfg, spec)
        plan.runs.append(PlannedRun(spec, digest, training, run_norm, str(out_dir), provenance))
    return plan


# -- the worker -------------------------------------------------------------------------------------

def _all_reduce(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum across workers; through the training device, since NCCL reduces only GPU tensors."""
    import torch.distributed as dist

    on_device = values.to(device)
    dist.all_reduce(on_device)
    return on_device.cpu()


def write_group_state(path: Path, members, fit) -> None:
    """A group's checkpoint: every member's state and the group's (tensors, numbers, strings, containers)."""
    torch.save({"members": {m.digest: m.state_dict() for m in members}, "fit": fit.state_dict()}, path)


def read_group_state(path: Path) -> dict[str, Any]:
    # weights_only: a checkpoint is data; unpickling it never runs code, whoever wrote the file.
    return torch.load(path, map_location="cpu", weights_only=True)


def _restore(checkpoint) -> dict[str, Any]:
    if checkpoint is None:
        return {"members": {}, "fit": {}}
    with checkpoint.as_directory() as d:
        return read_group_state(Path(d, GROUP_STATE))


def train_group(config: dict[str, Any]) -> None:
    """Ray Train's loop per worker: every member of the group, one pass per epoch, to the end."""
    import ray.train
    import ray.train.torch

    from featmap_ray.mapping import loop

    plan: GroupPlan = config["plan"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    state = _restore(ray.train.get_checkpoint())
    members = []
    for run in plan.runs:
        member = loop.Member(run.spec, run.digest, run.training, shape=plan.train.shape, norm=run.norm,
                             loss_options=config["loss_options"], device=device, rank=rank)
        saved = state["members"].get(run.digest)
        if saved is not None and saved["status"] != "failed":  # a failed model is retried from scratch
            member.load_state_dict(saved)
        members.append(member)
    stream, cache = plan.stream, config["cache_bytes"]
    fit = loop.GroupFit(
        members,
        data.PairLoader(plan.train, batch_size=stream.batch_size, rank=rank, world=world, shuffle_seed=stream.seed,
                        cache_bytes=cache),
        data.PairLoader(plan.val, batch_size=stream.batch_size, rank=rank, world=world, cache_bytes=cache),
        device,
        reduce=(lambda t: _all_reduce(t, device)) if world > 1 else None,
        wrap=ray.train.torch.prepare_model if world > 1 else None,
        state=state["fit"])
    recorder = _Recorder(config, plan) if rank == 0 else None
    passes = 0
    while fit.active:
        ran = fit.active
        finished = fit.epoch()
        passes += 1
        if recorder:
            recorder.epoch(ran, finished, fit)
        save = bool(finished) or not fit.active or passes % config["checkpoint_every"] == 0
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0 and save:
                write_group_state(Path(d, GROUP_STATE), members, fit)
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(_report(members, fit), checkpoint=checkpoint)


def _report(members, fit) -> dict[str, Any]:
    """Group progress; a one-model group (a sweep trial) also reports that model's last epoch, so
    Tune's schedulers can compare trials."""
    metrics = {"active": len(fit.active), "stopped": sum(m.status == "stopped" for m in members),
               "failed": sum(m.status == "failed" for m in members)}
    if len(members) == 1 and members[0].history:
        metrics.update(members[0].history[-1])
    return metrics


class _Recorder:
    """Rank 0's bookkeeping: per-epoch MLflow metrics, and publishing each member as it finishes."""

    def __init__(self, config: dict[str, Any], plan: GroupPlan):
        from mlflow import MlflowClient

        self.plan = plan
        self.runs = {r.digest: r for r in plan.runs}
        self.client = MlflowClient(config["tracking_uri"]) if config["tracking_uri"] else None

    def epoch(self, ran, finished, fit) -> None:
        if self.client is not None:
            for m in ran:
                if m.history and m.history[-1]["epoch"] == m.epoch - 1:
                    run_id = self.runs[m.digest].mlflow_run_id
                    metrics = {k: v for k, v in m.history[-1].items() if k != "epoch"}
                    tracking.log_metrics(self.client, run_id, metrics, step=m.epoch - 1)
        for m in finished:
            self.finish(m, fit.state_dict())

    def finish(self, m, group: dict[str, Any]) -> None:
        run = self.runs[m.digest]
        if m.status == "stopped":
            self.publish(m, group, run.out_dir)
        if self.client is None:
            return
        if m.status == "stopped":
            final = {f"final_{k}": v for k, v in m.best.items()}
            final.update({f"baseline_{name}_{k}": v for name, scores in (group["baselines"] or {}).items()
                          for k, v in scores.items()})
            with artefacts.published_version(run.out_dir).local_copy() as published:
                tracking.finish_child_run(self.client, run.mlflow_run_id, final, published)
        else:
            self.client.set_tag(run.mlflow_run_id, "error", (m.error or "")[:5000])
            self.client.set_terminated(run.mlflow_run_id, status="FAILED")

    def publish(self, m, group: dict[str, Any], out_dir: str) -> None:
        """The member's best epoch, with everything needed to use and judge it, as a finished run."""
        run = self.runs[m.digest]
        info = {"spec": run.spec.to_dict(), "digest": run.digest, "shape": list(self.plan.train.shape),
                "norm": run.norm, "history": m.history, "best": m.best, "best_epoch": m.best_epoch,
                "resumed_at": m.resumed_at, "train_means": group["train_means"], "baselines": group["baselines"],
                "training": run.training.model_dump(), "train_pairs": len(self.plan.train),
                "val_pairs": len(self.plan.val), "data": self.plan.data, "mlflow_run_id": run.mlflow_run_id,
                "provenance": run.provenance.to_json()}
        artefacts.publish(out_dir, m.best_model(), info)


# -- the driver -------------------------------------------------------------------------------------

def refit_suffix() -> str:
    return "--refit-" + dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def fit_group(cfg: Config, plan: GroupPlan, *, mlflow_parent: str | None = None,
              callbacks: list | None = None) -> GroupResult:
    """Fit every run of `plan` in one TorchTrainer; a failing run does not stop the others."""
    import ray.train
    from ray.train.torch import TorchTrainer

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", POLL_INTERVAL_S)  # read by the Train controller
    res = cfg.mapping.resources
    client = None
    for run in plan.runs:
        params = {**{f"spec.{k}": v for k, v in run.spec.to_dict().items()},
                  **{f"training.{k}": v for k, v in run.training.model_dump().items()},
                  "digest": run.digest, "data": plan.data, "train_pairs": len(plan.train), "val_pairs": len(plan.val),
                  "fused_group": plan.name, "group_size": len(plan.runs)}
        client, run.mlflow_run_id = tracking.child_run(cfg, run.key, run.spec.tags, parent=mlflow_parent,
                                                       params=params, digest=run.digest)
    trainer = TorchTrainer(
        train_group,
        train_loop_config={"plan": plan, "loss_options": cfg.mapping.loss_options,
                           "tracking_uri": tracking.tracking_uri(cfg), "cache_bytes": res.pair_cache_mb * 2**20,
                           "checkpoint_every": res.checkpoint_every},
        scaling_config=ray.train.ScalingConfig(
            num_workers=res.num_workers, use_gpu=res.gpus_per_worker > 0,
            resources_per_worker={"CPU": res.cpus_per_worker, "GPU": res.gpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=plan.name, storage_path=str(train_root(cfg)),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=res.max_failures),
            callbacks=callbacks or []),
    )
    try:
        result = trainer.fit()
        final = _restore(result.checkpoint)["members"]
    except Exception as e:  # the whole group failed (its runs' MLflow runs are reused on resume)
        message = [line for line in str(e).splitlines() if line.strip()][-1:] or [repr(e)]
        for run in plan.runs:
            client.set_terminated(run.mlflow_run_id, status="FAILED")
        return GroupResult(failed={run.key: message[0] for run in plan.runs})
    outcome = GroupResult()
    for run in plan.runs:
        member = final.get(run.digest, {})
        if member.get("status") == "stopped":
            outcome.fitted.append(run.key)
        else:
            outcome.failed[run.key] = member.get("error") or f"ended with status {member.get('status')!r}"
    if not outcome.failed:  # every model is published: the checkpoints have served their purpose
        (train_root(cfg) / plan.name).delete()
    return outcome


def publish_from_checkpoint(checkpoint, plan: GroupPlan, loss_options: dict) -> None:
    """Publish the best epoch of a one-run group that was stopped from outside (a sweep trial that
    ASHA ended early) from its last checkpoint to the run's folder; a run that finished itself has
    published already."""
    from featmap_ray.mapping import loop

    [run] = plan.runs
    if (artefacts.read_info(run.out_dir) or {}).get("digest") == run.digest:
        return
    state = _restore(checkpoint)
    member = loop.Member(run.spec, run.digest, run.training, shape=plan.train.shape, norm=run.norm,
                         loss_options=loss_options, device=torch.device("cpu"))
    member.load_state_dict(state["members"][run.digest])
    _Recorder({"tracking_uri": None}, plan).publish(member, state["fit"], run.out_dir)
