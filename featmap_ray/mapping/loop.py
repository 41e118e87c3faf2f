"""The fused epoch loop: the mapping models of one group trained on the same batches, without Ray.

Reads top to bottom like the paper's training — AdamW, batch 32 × accumulation 2,
ReduceLROnPlateau, early stopping on validation loss — for K models at once: every batch is read
once and steps each model, and each model keeps its own optimiser, LR schedule, early stopping,
best epoch and random stream (dropout, the negatives of `ntxent`), so a model trained in a group
is the model trained alone with the same seed. Closed-form families (ridge, Procrustes)
accumulate their sufficient statistics in the first pass and are solved at its end; the identity
and spatial-only baselines are scored on the validation pairs once.

What the reference lacks: shuffled batches, every hyper-parameter from the config, the best
epoch's weights kept and reported together (early stopping alone uses `min_delta`), NaN/Inf
stops naming the epoch, step and source images, and a state that resumes exactly.

`GroupFit.epoch()` runs one pass. `fit_group` drives it in a plain process; the Ray Train
adapter (`mapping/train.py`) drives it on every worker, with `reduce` summing across workers.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from featmap_ray.config import MappingTraining
from featmap_ray.cosine import median_cosine
from featmap_ray.mapping.artefacts import NormalisedMap, build_mapping
from featmap_ray.mapping.grid import RunSpec

if TYPE_CHECKING:  # the loop only iterates loaders; reading pairs (Lance) is the caller's
    from featmap_ray.stages.pairs import PairLoader

# The median rule of the validation cosine: the training loss's (spec §5).
COS_RULE = "upper"
BASELINES = ("identity", "spatial_only")


class NonFiniteError(FloatingPointError):
    """NaN or Inf in a training input, prediction or loss; the message names where."""


class Member:
    """One model of a group: its run, model, optimiser, schedule, random stream and history."""

    def __init__(self, spec: RunSpec, digest: str, training: MappingTraining, *, shape: tuple[int, int, int],
                 norm: dict | None, loss_options: dict[str, dict[str, Any]], device: torch.device, rank: int = 0):
        from featmap_ray.mapping.losses import build_loss

        self.spec, self.digest, self.training, self.device = spec, digest, training, device
        # The model's initial weights and its private random stream come from the seed alone, as
        # if it were trained on its own: built right after seeding, then the stream is set aside.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(training.seed + rank)
            self.model: NormalisedMap = build_mapping(spec, shape, norm).to(device)
            self.rng = _rng_state(device)
        self.loss = build_loss(spec.loss, loss_options, seed=training.seed + rank)
        self.inner: nn.Module = self.model.inner  # what training calls; DDP-wrapped on several workers
        self.trainable, self.closed_form = self.model.inner.trainable, self.model.inner.closed_form
        self.optimiser = self.plateau = None
        if self.trainable:
            self.optimiser = torch.optim.AdamW(self.model.inner.parameters(), lr=training.lr,
                                               weight_decay=training.weight_decay)
            self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimiser, mode="min", factor=training.plateau_factor, patience=training.plateau_patience,
                min_lr=training.min_lr)
        self.epoch = 0  # epochs finished
        self.history: list[dict[str, float]] = []
        self.best_epoch: int | None = None
        self.best_val_loss = math.inf
        self.best_state: dict[str, torch.Tensor] | None = None
        self.stop_ref = math.inf  # val_loss of the last improvement by more than min_delta
        self.bad_epochs = 0
        self.status = "training"  # -> "stopped" or "failed"
        self.error: str | None = None
        self.resumed_at: list[int] = []
        # Within a pass: the training loss sum and maps seen; closed-form statistics being accumulated.
        self.loss_sum, self.seen, self.stats = 0.0, 0, None

    @property
    def key(self) -> str:
        return self.spec.key

    @property
    def active(self) -> bool:
        return self.status == "training"

    @property
    def best(self) -> dict[str, float]:
        """The metrics of the epoch whose weights are kept."""
        return self.history[self.best_epoch] if self.best_epoch is not None else {}

    def best_model(self) -> NormalisedMap:
        """A CPU copy of the model with the best epoch's weights."""
        model = copy.deepcopy(self.model).cpu()
        model.load_state_dict(self.best_state)
        return model.eval()

    def fail(self, message: str) -> None:
        self.status, self.error = "failed", message

    @contextlib.contextmanager
    def own_rng(self) -> Iterator[None]:
        """Run with this model's random stream in torch's global generator(s), then set it aside."""
        outer = _rng_state(self.device)
        _set_rng_state(self.rng, self.device)
        try:
            yield
        finally:
            self.rng = _rng_state(self.device)
            _set_rng_state(outer, self.device)

    # -- resumable state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What resumes this model exactly. A stopped model has been published (its weights live in
        its run folder), so only the fact is kept: checkpoints stay the size of the models in training."""
        if self.status == "stopped":
            return {"digest": self.digest, "status": self.status}
        return {"digest": self.digest, "model": _cpu(self.model.state_dict()), "best_state": self.best_state,
                "optimiser": self.optimiser.state_dict() if self.optimiser else None,
                "plateau": self.plateau.state_dict() if self.plateau else None,
                "rng": self.rng, "loss_rng": self.loss.generator.get_state() if self.loss.generator else None,
                "epoch": self.epoch, "history": self.history, "best_epoch": self.best_epoch,
                "best_val_loss": self.best_val_loss, "stop_ref": self.stop_ref, "bad_epochs": self.bad_epochs,
                "status": self.status, "error": self.error, "resumed_at": self.resumed_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["digest"] != self.digest:
            raise ValueError(f"run {self.key}: checkpoint of another model (digest {state['digest']} != {self.digest})")
        if state["status"] == "stopped":
            self.status = "stopped"
            return
        self.model.load_state_dict(state["model"])
        if self.optimiser:
            self.optimiser.load_state_dict(state["optimiser"])
            self.plateau.load_state_dict(state["plateau"])
        self.rng = state["rng"]
        if self.loss.generator is not None and state["loss_rng"] is not None:
            self.loss.generator.set_state(state["loss_rng"])
        for name in ("epoch", "history", "best_epoch", "best_val_loss", "stop_ref", "bad_epochs", "status", "error",
                     "best_state"):
            setattr(self, name, state[name])
        self.resumed_at = [*state["resumed_at"], self.epoch] if self.active else state["resumed_at"]


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _non_finite_ids(x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, source_ids: list[str]) -> list[str]:
    bad = torch.nonzero(~(torch.isfinite(x).flatten(1).all(1) & torch.isfinite(y).flatten(1).all(1))).flatten()
    return [source_ids[int(rows[i])] for i in bad[:5]]


class GroupFit:
    """One pass per `epoch()` over the training pairs for every active member, then validation.

    `reduce` sums a float64 tensor across workers (identity in one process); `wrap` turns a
    member's inner model into what training calls (DDP on several workers)."""

    def __init__(self, members: list[Member], train: PairLoader, val: PairLoader, device: torch.device, *,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 wrap: Callable[[nn.Module], nn.Module] | None = None, state: dict[str, Any] | None = None):
        self.members, self.train, self.val, self.device = members, train, val, device
        self.reduce = reduce or (lambda t: t)
        state = state or {}
        # Per-channel means of the raw training inputs and targets (what a rank-k truncation of a
        # linear map falls back to) and the baselines' validation scores: measured in the first pass.
        self.train_means: dict[str, list[float]] | None = state.get("train_means")
        self.baselines: dict[str, dict[str, float]] | None = state.get("baselines")
        self.train_seconds = 0.0  # of the last pass
        if wrap is not None:
            for m in members:
                if m.trainable:
                    m.inner = wrap(m.model.inner)

    @property
    def active(self) -> list[Member]:
        return [m for m in self.members if m.active]

    def _check_data(self, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, source_ids: list[str],
                    where: str) -> None:
        """Stop on NaN/Inf in a batch's pairs, naming the images; every worker learns of it (a worker
        that stopped alone would leave the others waiting in a collective)."""
        ids = [] if torch.isfinite(x).all() and torch.isfinite(y).all() else _non_finite_ids(x, y, rows, source_ids)
        if self.reduce(torch.tensor([float(bool(ids))], dtype=torch.float64)).item():
            raise NonFiniteError(f"{where}: non-finite values in the feature maps of source_id(s) "
                                 f"{ids or '(on another worker)'}; fix or re-extract them")

    def state_dict(self) -> dict[str, Any]:
        return {"train_means": self.train_means, "baselines": self.baselines}

    def epoch(self) -> list[Member]:
        """Train every active member for one epoch and validate it; returns the members that
        stopped or failed in this pass. Non-finite input data fails the whole group (it is the
        same data for all), with the images named; a member's own non-finite loss fails only it."""
        before = {id(m): m.status for m in self.members}
        try:
            self._train_pass(self.active)
            if self.active:  # without the members that failed in the pass (maybe all of them)
                self._validate(self.active)
        except NonFiniteError as e:
            for m in self.active:
                m.fail(str(e))
        return [m for m in self.members if before[id(m)] == "training" and not m.active]

    # -- one pass over the training pairs -----------------------------------------------------------
    def _train_pass(self, active: list[Member]) -> None:
        from featmap_ray.mapping.closed_form import SufficientStats

        # Members resumed at different epochs share a pass; its order follows the least advanced.
        epoch = min(m.epoch for m in active)
        started = time.perf_counter()
        trainable = [m for m in active if m.trainable]
        for m in active:
            m.seen, m.loss_sum = 0, 0.0
            if m.closed_form:
                m.stats = SufficientStats(m.model.inner.channels)
            if m.trainable:
                m.inner.train()
                m.optimiser.zero_grad(set_to_none=True)
        measure = self.train_means is None
        sums = torch.zeros(2, self.train.pairs.shape[0] + 1, dtype=torch.float64)
        step = 0
        for step, (rows, x, y) in enumerate(self.train.batches(epoch), 1):
            where = f"epoch {epoch}, step {step}"
            x, y = x.to(self.device, non_blocking=True).float(), y.to(self.device, non_blocking=True).float()
            self._check_data(x, y, rows, self.train.pairs.source_ids, where)
            if measure:
                sums[0, :-1] += x.double().sum((0, 2, 3)).cpu()
                sums[1, :-1] += y.double().sum((0, 2, 3)).cpu()
                sums[:, -1] += x.shape[0] * x.shape[2] * x.shape[3]
            for m in trainable:
                if m.active:
                    self._train_step(m, x, y, step, where)
            for m in active:
                if m.closed_form:
                    m.stats.update(_model_input(m, m.model.normalise(x)), m.model.normalise(y))
        for m in trainable:
            if m.active and step % m.training.accumulate:
                m.optimiser.step()  # the epoch's last, partial accumulation
        for m in active:
            if m.closed_form:
                self._solve(m)
        if measure:
            sums = self.reduce(sums)
            n = max(float(sums[0, -1]), 1.0)
            self.train_means = {"x": (sums[0, :-1] / n).tolist(), "y": (sums[1, :-1] / n).tolist()}
        self.train_seconds = time.perf_counter() - started

    def _train_step(self, m: Member, x: torch.Tensor, y: torch.Tensor, step: int, where: str) -> None:
        with m.own_rng():
            pred = m.inner(m.model.normalise(x))
            loss = m.loss(pred, m.model.normalise(y))
        # Every worker must agree before backward (DDP reduces gradients inside it).
        bad = self.reduce(torch.tensor([0.0 if torch.isfinite(loss) else 1.0], dtype=torch.float64))
        if bad.item():
            finite = "finite" if torch.isfinite(pred).all() else "non-finite"
            m.fail(f"run {m.key}, {where}: loss is not finite (prediction {finite}) on at least one worker; "
                   "its last good checkpoint is kept")
            return
        (loss / m.training.accumulate).backward()
        if step % m.training.accumulate == 0:
            m.optimiser.step()
            m.optimiser.zero_grad(set_to_none=True)
        m.loss_sum += float(loss.detach()) * len(x)
        m.seen += len(x)

    def _solve(self, m: Member) -> None:
        stats = m.stats
        c = stats.channels
        packed = torch.cat([torch.tensor([float(stats.n)], dtype=torch.float64), stats.sum_x, stats.sum_y,
                            stats.xtx.flatten(), stats.xty.flatten()])
        packed = self.reduce(packed)  # every worker saw another shard: sum their statistics
        stats.n = int(packed[0])
        stats.sum_x, stats.sum_y = packed[1:1 + c].clone(), packed[1 + c:1 + 2 * c].clone()
        stats.xtx = packed[1 + 2 * c:1 + 2 * c + c * c].view(c, c).clone()
        stats.xty = packed[1 + 2 * c + c * c:].view(c, c).clone()
        m.model.inner.fit(stats)
        m.stats = None

    # -- validation ---------------------------------------------------------------------------------
    def _validate(self, active: list[Member]) -> None:
        from featmap_ray.mapping.models import build_model, is_geometric

        manipulation = active[0].spec.manipulation
        baselines = {}
        if self.baselines is None:
            c, h, w = self.val.pairs.shape
            names = [n for n in BASELINES if n == "identity" or is_geometric(manipulation)]
            baselines = {n: build_model(n, c, h, w, manipulation=manipulation) for n in names}
        # Per member and baseline: [loss sum, cosine sum, squared-error sum, maps]
        sums = torch.zeros(len(active) + len(baselines), 4, dtype=torch.float64)
        for m in active:
            m.model.eval()
        bad_ids: list[str] = []
        with torch.no_grad():
            for rows, x, y in self.val.batches():
                x, y = x.to(self.device).float(), y.to(self.device).float()
                if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
                    bad_ids += _non_finite_ids(x, y, rows, self.val.pairs.source_ids)
                    continue
                for i, m in enumerate(active):
                    pred = m.model.inner(m.model.normalise(x))
                    sums[i, 0] += float(m.loss(pred, m.model.normalise(y))) * len(x)
                    sums[i, 1:] += _scores(m.model.denormalise(pred), y)
                for j, model in enumerate(baselines.values(), len(active)):
                    sums[j, 1:] += _scores(model(x), y)
        sums = self.reduce(torch.cat([sums, torch.full((1, 4), float(bool(bad_ids)), dtype=torch.float64)]))
        if sums[-1, 0]:
            raise NonFiniteError(f"validation: non-finite values in the feature maps of source_id(s) "
                                 f"{bad_ids[:5] or '(on another worker)'}; fix or re-extract them")
        sums = sums[:-1]
        n = sums[:, 3].clamp_min(1.0)
        if baselines:
            self.baselines = {name: {f"val_cos_median_{COS_RULE}": float(sums[j, 1] / n[j]),
                                     "val_mse": float(sums[j, 2] / n[j])}
                              for j, name in enumerate(baselines, len(active))}
        for i, m in enumerate(active):
            self._end_epoch(m, {"val_loss": float(sums[i, 0] / n[i]), f"val_cos_median_{COS_RULE}": float(sums[i, 1] / n[i]),
                                "val_mse": float(sums[i, 2] / n[i])})

    def _end_epoch(self, m: Member, metrics: dict[str, float]) -> None:
        tr = m.training
        if not math.isfinite(metrics["val_loss"]):
            m.fail(f"run {m.key}, epoch {m.epoch}: validation loss is {metrics['val_loss']}")
            return
        totals = self.reduce(torch.tensor([m.loss_sum, float(m.seen)], dtype=torch.float64))
        if totals[1]:
            metrics["train_loss"] = float(totals[0] / totals[1])
        # The kept weights are those of the lowest validation loss, and the run reports that epoch;
        # min_delta only decides when to give up.
        if metrics["val_loss"] < m.best_val_loss:
            m.best_val_loss, m.best_epoch = metrics["val_loss"], m.epoch
            m.best_state = _cpu(m.model.state_dict())
        if metrics["val_loss"] < m.stop_ref - tr.min_delta:
            m.stop_ref, m.bad_epochs = metrics["val_loss"], 0
        else:
            m.bad_epochs += 1
        if m.trainable:
            m.plateau.step(metrics["val_loss"])
            metrics["lr"] = m.optimiser.param_groups[0]["lr"]
        metrics.update(epoch=m.epoch, best_val_loss=m.best_val_loss, epoch_seconds=self.train_seconds)
        m.history.append(metrics)
        m.epoch += 1
        if m.bad_epochs >= tr.patience or m.epoch >= tr.max_epochs or not m.trainable:
            m.status = "stopped"


def _model_input(m: Member, x: torch.Tensor) -> torch.Tensor:
    from featmap_ray.mapping.models import model_input

    return model_input(m.model.inner, x)


def _scores(mapped: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[Σ median cosine, Σ per-map MSE, maps] of a batch, in raw feature space."""
    cos = median_cosine(mapped, target, COS_RULE).double().sum()
    mse = (mapped - target).double().pow(2).flatten(1).mean(1).sum()
    return torch.stack([cos.cpu(), mse.cpu(), torch.tensor(float(len(mapped)), dtype=torch.float64)])


def fit_group(members: list[Member], train: PairLoader, val: PairLoader, device: torch.device,
              on_finished: Callable[[Member, GroupFit], None] | None = None) -> GroupFit:
    """Train a group to the end in this process (no Ray): every member stops or fails."""
    fit = GroupFit(members, train, val, device)
    while fit.active:
        for m in fit.epoch():
            if on_finished is not None:
                on_finished(m, fit)
    return fit
