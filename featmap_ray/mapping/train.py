"""One mapping run on Ray Train: read pairs, fit, keep the best-by-validation model.

`fit_run` is the driver: it prepares the pairs and normalisation statistics, opens the run's
MLflow run, and fits a `TorchTrainer` whose workers run `train_loop`. The loop reads top to
bottom like the paper's training (AdamW, batch 32 x accumulation 2, ReduceLROnPlateau, early
stopping on validation loss) with what the reference lacks: shuffled batches, hyper-parameters
taken from the config, the best model (not the last) kept, and resumption from the last epoch.
Closed-form families (ridge, Procrustes) go through the same loop: one pass accumulates their
sufficient statistics (summed across workers), then they are solved; baselines are only scored.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from featmap_ray.config import Config, MappingTraining
from featmap_ray.mapping.grid import RunSpec

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
RUN_FILE = "run.json"
STATE_FILE = "state.pt"


class NonFiniteError(FloatingPointError):
    """NaN or Inf in a training input, prediction or loss; the message names where."""


class NormalisedMap(nn.Module):
    """Raw features in, raw features out: x -> denorm(model(norm(x))).

    Training computes the loss in normalised space (`inner(norm(x))` against `norm(y)`), and
    evaluation, analysis and reconstruction call `forward` on raw features, so normalisation
    is applied and inverted the same way everywhere (the reference de-normalises outputs it
    never normalised the inputs of)."""

    def __init__(self, inner: nn.Module, mean: np.ndarray | None, std: np.ndarray | None):
        super().__init__()
        self.inner = inner
        self.normalised = mean is not None
        c = inner.channels
        self.register_buffer("mean", torch.as_tensor(mean if mean is not None else np.zeros(c), dtype=torch.float32).view(1, c, 1, 1))
        self.register_buffer("std", torch.as_tensor(std if std is not None else np.ones(c), dtype=torch.float32).view(1, c, 1, 1))

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std if self.normalised else x

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std + self.mean if self.normalised else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.denormalise(self.inner(self.normalise(x)))


def build_mapping(spec: RunSpec, shape: tuple[int, int, int], norm: dict | None) -> NormalisedMap:
    from featmap_ray.mapping.models import build_model

    c, h, w = shape
    inner = build_model(spec.model, c, h, w, manipulation=spec.manipulation, apply_transform=spec.apply_transform,
                        **spec.hparams)
    return NormalisedMap(inner, None if norm is None else np.asarray(norm["mean"]),
                         None if norm is None else np.asarray(norm["std"]))


# -- run artefacts ------------------------------------------------------------------------------

def runs_root(cfg: Config) -> Path:
    return Path(cfg.storage) / "mapping" / "runs" / cfg.mapping.study


def run_dir(cfg: Config, spec: RunSpec) -> Path:
    return runs_root(cfg) / spec.key


def save_artefacts(directory: Path, model: NormalisedMap, info: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(directory / MODEL_FILE))
    (directory / RUN_FILE).write_text(json.dumps(info, indent=1, default=float))


def load_run(directory: str | Path) -> tuple[NormalisedMap, RunSpec, dict[str, Any]]:
    """A finished run's best model (raw -> raw features), its spec and its recorded info."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / RUN_FILE).exists():
        raise FileNotFoundError(f"no finished mapping run in {directory} (missing {RUN_FILE})")
    info = json.loads((directory / RUN_FILE).read_text())
    spec = RunSpec.from_dict(info["spec"])
    model = build_mapping(spec, tuple(info["shape"]), info["norm"])
    model.load_state_dict(load_file(str(directory / MODEL_FILE)))
    return model.eval(), spec, info


def publish(checkpoint_dir: str, spec: RunSpec, out_dir: Path, **extra: Any) -> dict[str, Any]:
    """Write the best model of a Ray Train checkpoint (local path) to `out_dir` atomically: a folder
    with run.json is a finished run, never a half-written one."""
    state = torch.load(Path(checkpoint_dir, STATE_FILE), map_location="cpu", weights_only=False)
    model = build_mapping(spec, tuple(state["shape"]), state["norm"])
    model.load_state_dict(state["best_model"])
    info = {"spec": spec.to_dict(), "shape": state["shape"], "norm": state["norm"], "history": state["history"],
            "resumed_at": state["resumed_at"],
            "best": min(state["history"], key=lambda m: m["val_loss"]), "digest": spec.digest(), **extra}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".tmp-"))
    save_artefacts(tmp, model, info)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return info


def finished_runs(cfg: Config) -> list[Path]:
    root = runs_root(cfg)
    return sorted(p.parent for p in root.glob(f"*/{RUN_FILE}")) if root.exists() else []


# -- the training loop (runs on every Ray Train worker) -----------------------------------------

def _world() -> tuple[int, int]:
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def _all_reduce(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum across workers; through the training device, since NCCL reduces only GPU tensors."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        on_device = values.to(device)
        dist.all_reduce(on_device)
        return on_device.cpu()
    return values


def _batches(shard, batch_size: int, device, **kw):
    for batch in shard.iter_torch_batches(batch_size=batch_size, device=device, **kw):
        yield batch["row"], batch["x"].float(), batch["y"].float()


def _check_finite(name: str, t: torch.Tensor, rows: torch.Tensor, source_ids: list[str], where: str) -> None:
    if not torch.isfinite(t).all():
        bad = torch.flatnonzero(~torch.isfinite(t).flatten(1).all(1))
        ids = [source_ids[int(rows[i])] for i in bad[:5]]
        raise NonFiniteError(f"{where}: non-finite values in {name} of source_id(s) {ids}")


def _evaluate(model: NormalisedMap, loss_fn, shard, batch_size: int, device) -> dict[str, float]:
    """Validation loss (mean over batches weighted by size) and median cosine, summed over workers."""
    from featmap_ray.mapping.losses import median_cosine

    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for _, x, y in _batches(shard, batch_size, device):
            pred = model.inner(model.normalise(x))
            sums[0] += float(loss_fn(pred, model.normalise(y))) * len(x)
            sums[1] += float(median_cosine(model.denormalise(pred), y).sum())
            sums[2] += len(x)
    sums = _all_reduce(sums, device)
    n = max(float(sums[2]), 1.0)
    return {"val_loss": float(sums[0]) / n, "val_cos_median": float(sums[1]) / n}


def _fit_closed_form(model: NormalisedMap, shard, batch_size: int, device) -> None:
    from featmap_ray.mapping.closed_form import SufficientStats
    from featmap_ray.mapping.models import model_input

    stats = SufficientStats(model.inner.channels)
    for _, x, y in _batches(shard, batch_size, device):
        stats.update(model_input(model.inner, model.normalise(x)), model.normalise(y))
    packed = torch.cat([torch.tensor([float(stats.n)], dtype=torch.float64), stats.sum_x, stats.sum_y,
                        stats.xtx.flatten(), stats.xty.flatten()])
    packed = _all_reduce(packed, device)  # every worker saw a different shard: sum their statistics
    c = stats.channels
    stats.n = int(packed[0])
    stats.sum_x, stats.sum_y = packed[1:1 + c].clone(), packed[1 + c:1 + 2 * c].clone()
    stats.xtx = packed[1 + 2 * c:1 + 2 * c + c * c].view(c, c).clone()
    stats.xty = packed[1 + 2 * c + c * c:].view(c, c).clone()
    model.inner.fit(stats)


def _log_mlflow(config: dict, metrics: dict[str, float], step: int) -> None:
    if not config.get("mlflow_run_id"):
        return
    from mlflow import MlflowClient

    from featmap_ray.tracking import log_metrics

    log_metrics(MlflowClient(config["tracking_uri"]), config["mlflow_run_id"], metrics, step)


def train_loop(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from featmap_ray.mapping.losses import build_loss

    spec = RunSpec.from_dict(config["spec"])
    tr = MappingTraining(**config["training"])
    rank, world = _world()
    torch.manual_seed(tr.seed + rank)
    device = ray.train.torch.get_device()
    model = build_mapping(spec, tuple(config["shape"]), config["norm"]).to(device)
    loss_fn = build_loss(spec.loss, config["loss_options"])
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    source_ids = config["train_source_ids"]

    # Resume: the latest checkpoint holds the last finished epoch's state and the best model so far.
    start_epoch, best, bad_epochs, history, best_state, resumed_at = 0, math.inf, 0, [], None, []
    checkpoint = ray.train.get_checkpoint()
    state = None
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d, STATE_FILE), map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        start_epoch, best, bad_epochs, history = state["epoch"] + 1, state["best"], state["bad_epochs"], state["history"]
        best_state = state["best_model"]
        resumed_at = [*state["resumed_at"], start_epoch]
        log.info("%s: resuming after epoch %d (best val_loss %.5f)", spec.key, state["epoch"], best)

    trainable = model.inner.trainable
    if trainable:
        wrapped = ray.train.torch.prepare_model(model.inner) if world > 1 else model.inner  # DDP across workers
        optimiser = torch.optim.AdamW(wrapped.parameters(), lr=tr.lr, weight_decay=tr.weight_decay)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimiser, mode="min", factor=tr.plateau_factor,
                                                             patience=tr.plateau_patience, min_lr=tr.min_lr)
        if state is not None:
            optimiser.load_state_dict(state["optimiser"])
            plateau.load_state_dict(state["plateau"])
    # A run that already stopped (early stopping, or a baseline scored once) has nothing left to do.
    finished = state is not None and state["done"]
    epochs = range(start_epoch, tr.max_epochs if trainable else 1) if not finished else range(0)

    for epoch in epochs:
        started = time.perf_counter()
        train_loss, seen = 0.0, 0
        if trainable:
            wrapped.train()
            optimiser.zero_grad(set_to_none=True)
            step = 0
            for step, (rows, x, y) in enumerate(_batches(train_shard, tr.batch_size, device,
                                                         local_shuffle_buffer_size=tr.shuffle_buffer,
                                                         local_shuffle_seed=tr.seed * 1000 + epoch * world + rank), 1):
                where = f"run {spec.key}, epoch {epoch}, step {step}"
                _check_finite("the original feature maps", x, rows, source_ids, where)
                _check_finite("the manipulated feature maps", y, rows, source_ids, where)
                pred = wrapped(model.normalise(x))
                loss = loss_fn(pred, model.normalise(y))
                if not torch.isfinite(loss):
                    finite = "finite" if torch.isfinite(pred).all() else "non-finite"
                    raise NonFiniteError(f"{where}: loss is {float(loss)} (prediction {finite}); the last good "
                                         "checkpoint is kept")
                (loss / tr.accumulate).backward()
                if step % tr.accumulate == 0:
                    optimiser.step()
                    optimiser.zero_grad(set_to_none=True)
                train_loss += float(loss) * len(x)
                seen += len(x)
            if step % tr.accumulate:
                optimiser.step()  # the epoch's last, partial accumulation
        elif model.inner.closed_form:
            _fit_closed_form(model, train_shard, tr.batch_size, device)

        metrics = _evaluate(model, loss_fn, val_shard, tr.batch_size, device)
        totals = _all_reduce(torch.tensor([train_loss, float(seen)], dtype=torch.float64), device)
        if totals[1]:
            metrics["train_loss"] = float(totals[0] / totals[1])
        if not math.isfinite(metrics["val_loss"]):
            raise NonFiniteError(f"run {spec.key}, epoch {epoch}: validation loss is {metrics['val_loss']}")
        improved = metrics["val_loss"] < best - tr.min_delta
        if improved or best_state is None:
            best = min(best, metrics["val_loss"])
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            bad_epochs = 0
        else:
            bad_epochs += 1
        if trainable:
            plateau.step(metrics["val_loss"])
            metrics["lr"] = optimiser.param_groups[0]["lr"]
        metrics.update(epoch=epoch, best_val_loss=best, epoch_seconds=time.perf_counter() - started)
        history.append(metrics)
        stop = bad_epochs >= tr.patience or epoch + 1 >= tr.max_epochs or not trainable
        metrics["stopped"] = float(stop)

        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                _log_mlflow(config, {k: v for k, v in metrics.items() if k not in ("epoch", "stopped")}, epoch)
                torch.save({"model": model.state_dict(), "best_model": best_state, "epoch": epoch, "best": best,
                            "bad_epochs": bad_epochs, "history": history, "done": stop, "resumed_at": resumed_at,
                            "shape": config["shape"], "norm": config["norm"],
                            "optimiser": optimiser.state_dict() if trainable else None,
                            "plateau": plateau.state_dict() if trainable else None}, Path(d, STATE_FILE))
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)
        if stop:
            break


# -- the driver ----------------------------------------------------------------------------------

def _training_config(cfg: Config, overrides: dict[str, Any]) -> MappingTraining:
    unknown = sorted(set(overrides) - set(MappingTraining.model_fields))
    if unknown:
        raise ValueError(f"unknown training setting(s) {unknown}; available: {sorted(MappingTraining.model_fields)}")
    return MappingTraining(**{**cfg.mapping.training.model_dump(), **overrides})


def prepare(cfg: Config, spec: RunSpec, training: MappingTraining):
    """Pairs (train and val Ray Datasets), their shape and the normalisation statistics of a run."""
    from featmap_ray import store
    from featmap_ray.mapping import data

    st = store.Store(cfg.storage)
    pairs = data.load_pairs(st, dataset=spec.dataset, backbone=spec.backbone, layer=spec.layer,
                            manipulation=spec.manipulation, split="train")
    if len(pairs) == 0:
        raise ValueError(f"run {spec.key}: no training pairs (original + {spec.manipulation!r}) of dataset "
                         f"{spec.dataset!r} in {pairs.uri}")
    pairs = data.sample(pairs, training.max_train_pairs, training.seed)
    train_pairs, val_pairs = data.train_val_split(pairs, training.val_fraction, training.seed)
    norm = None
    if spec.normalise:
        stats = data.cached_channel_stats(st, Path(cfg.storage) / "mapping", dataset=spec.dataset,
                                          backbone=spec.backbone, layer=spec.layer)
        norm = stats.to_json()
    return train_pairs, val_pairs, norm


def fit_run(cfg: Config, spec: RunSpec, *, training_overrides: dict[str, Any] | None = None,
            mlflow_parent: str | None = None, callbacks: list | None = None, out_dir: Path | None = None,
            run_name: str | None = None) -> dict[str, Any]:
    """Fit one run with a TorchTrainer and publish its best model to `out_dir` (default: the run's
    folder). Re-running with the same name resumes from the last checkpoint."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from featmap_ray import tracking
    from featmap_ray.mapping import data

    training = _training_config(cfg, training_overrides or {})
    train_pairs, val_pairs, norm = prepare(cfg, spec, training)
    res = cfg.mapping.resources
    run_name = run_name or f"{cfg.mapping.study}--{spec.key}"
    out_dir = out_dir or run_dir(cfg, spec)

    client, mlflow_run_id = tracking.child_run(cfg, run_name, spec.tags, parent=mlflow_parent,
                                               params={**{f"spec.{k}": v for k, v in spec.to_dict().items()},
                                                       **{f"training.{k}": v for k, v in training.model_dump().items()},
                                                       "train_pairs": len(train_pairs), "val_pairs": len(val_pairs)})
    loop_config = {
        "spec": spec.to_dict(), "training": training.model_dump(), "shape": list(train_pairs.shape), "norm": norm,
        "loss_options": cfg.mapping.loss_options, "train_source_ids": train_pairs.source_ids,
        "tracking_uri": tracking.tracking_uri(cfg), "mlflow_run_id": mlflow_run_id,
    }
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        datasets={"train": data.ray_dataset(train_pairs), "val": data.ray_dataset(val_pairs)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=res.num_workers, use_gpu=res.gpus_per_worker > 0,
            resources_per_worker={"CPU": res.cpus_per_worker, "GPU": res.gpus_per_worker} if res.num_workers else None),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=str(Path(cfg.storage) / "mapping" / "train"),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=res.max_failures),
            callbacks=callbacks or []),
    )
    try:
        result = trainer.fit()
        with result.checkpoint.as_directory() as checkpoint_dir:
            info = publish(checkpoint_dir, spec, out_dir,
                           training=training.model_dump(), train_pairs=len(train_pairs),
                           val_pairs=len(val_pairs), mlflow_run_id=mlflow_run_id)
    except Exception as e:
        client.set_terminated(mlflow_run_id, status="FAILED")
        raise RuntimeError(f"mapping run {spec.key} failed: {e}") from e
    final = {f"final_{k}": v for k, v in info["best"].items() if k != "stopped"}
    tracking.finish_child_run(client, mlflow_run_id, final, out_dir)
    return {"key": spec.key, "dir": str(out_dir), **final}
