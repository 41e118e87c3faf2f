"""Losses between predicted and target (B, C, H, W) feature maps, and weighted sums of them.

`LOSSES[name](pred, target, **options)` returns a scalar. `build_loss("mse+median_cos")` or
`build_loss({"mse": 0.3, "median_cos": 0.7})` (= `PAPER_LOSS`) combines them and keeps the
unweighted value of every term of the last call in `last_terms` for logging.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from featmap_ray import cosine

LossFn = Callable[..., Tensor]
LOSSES: dict[str, LossFn] = {}
PAPER_LOSS = {"mse": 0.3, "median_cos": 0.7}
COS_EPS = cosine.EPS
# Runtime arguments a loss may accept that are not config options.
_RUNTIME_ARGS = ("generator",)


def register_loss(name: str) -> Callable[[LossFn], LossFn]:
    """Decorator: add `fn(pred, target, **options)` to `LOSSES`; its keyword defaults are the options."""

    def decorator(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        LOSSES[name] = fn
        return fn

    return decorator


def loss_options(name: str) -> dict[str, Any]:
    """The config options of loss `name` with their defaults."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; registered: {', '.join(sorted(LOSSES))}")
    params = list(inspect.signature(LOSSES[name]).parameters.values())[2:]
    return {p.name: p.default for p in params if p.name not in _RUNTIME_ARGS}


def _check_pair(pred: Tensor, target: Tensor) -> None:
    if pred.ndim != 4 or pred.shape != target.shape:
        raise ValueError(f"loss: expected pred and target of the same (B, C, H, W) shape, "
                         f"got {tuple(pred.shape)} and {tuple(target.shape)}")


@register_loss("mse")
def mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over all B·C·H·W elements."""
    _check_pair(pred, target)
    return F.mse_loss(pred, target)


@register_loss("huber")
def huber(pred: Tensor, target: Tensor, delta: float = 1.0) -> Tensor:
    """SmoothL1 with beta = delta: quadratic (÷ delta) below delta, linear above; mean."""
    _check_pair(pred, target)
    if delta <= 0:
        raise ValueError(f"huber: delta must be > 0, got {delta!r}")
    return F.smooth_l1_loss(pred, target, beta=delta)


@register_loss("median_cos")
def median_cos(pred: Tensor, target: Tensor) -> Tensor:
    """1 − batch mean of the per-image median cosine, rule "upper" (element ⌊H·W/2⌋ of the
    ascending per-position cosines, as the reference); the gradient flows through one position
    per image."""
    return 1 - cosine.median_cosine(pred, target, "upper").mean()


@register_loss("mean_cos")
def mean_cos(pred: Tensor, target: Tensor) -> Tensor:
    """1 − mean of the per-position cosines."""
    return 1 - cosine.position_cosine(pred, target).mean()


@register_loss("trimmed_cos")
def trimmed_cos(pred: Tensor, target: Tensor, trim_frac: float = 0.25) -> Tensor:
    """1 − mean of the per-position cosines after dropping ⌊trim_frac·H·W⌋ lowest and highest."""
    if not 0 <= trim_frac < 0.5:
        raise ValueError(f"trimmed_cos: trim_frac must be in [0, 0.5), got {trim_frac!r}")
    cos = cosine.position_cosine(pred, target)
    n = cos.shape[1]
    drop = math.floor(trim_frac * n)
    if n - 2 * drop < 1:
        raise ValueError(f"trimmed_cos: trim_frac {trim_frac} leaves no positions of {n}")
    return 1 - cos.sort(dim=1).values[:, drop:n - drop].mean()


@register_loss("patch_mse")
def patch_mse(pred: Tensor, target: Tensor, patch_size: int = 4) -> Tensor:
    """MSE after adaptive average pooling both maps to (H // patch_size, W // patch_size).

    A map smaller than one patch is an error rather than silently pooled to 1×1.
    """
    _check_pair(pred, target)
    if not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_mse: patch_size must be a positive int, got {patch_size!r}")
    h, w = pred.shape[-2:]
    if h < patch_size or w < patch_size:
        raise ValueError(f"patch_mse: the {h}×{w} map is smaller than one {patch_size}×{patch_size} patch")
    size = (h // patch_size, w // patch_size)
    return F.mse_loss(F.adaptive_avg_pool2d(pred, size), F.adaptive_avg_pool2d(target, size))


def ntxent_negatives(num_rows: int, num_negatives: int, generator: torch.Generator | None = None) -> Tensor | None:
    """Row indices of the negatives shared by all anchors, or None when every other row is used.

    Drawn uniformly without replacement from all B·H·W rows (on the CPU, from `generator` or
    torch's global RNG); an anchor's own row, if drawn, is masked out of its negatives.
    """
    if num_negatives >= num_rows - 1:
        return None
    return torch.randperm(num_rows, generator=generator)[:num_negatives]


@register_loss("ntxent")
def ntxent(pred: Tensor, target: Tensor, temperature: float = 0.1, num_negatives: int = 1024,
           generator: torch.Generator | None = None) -> Tensor:
    """InfoNCE over positions with cosine logits / temperature, mean over all B·H·W anchors.

    Anchor: a predicted position vector; positive: the target vector at the same (image,
    position); negatives: up to `num_negatives` target vectors of the batch's other positions,
    one draw per call shared by all anchors (`ntxent_negatives`), so memory is B·H·W × K.
    """
    _check_pair(pred, target)
    if temperature <= 0:
        raise ValueError(f"ntxent: temperature must be > 0, got {temperature!r}")
    if not isinstance(num_negatives, int) or num_negatives < 1:
        raise ValueError(f"ntxent: num_negatives must be a positive int, got {num_negatives!r}")
    p = F.normalize(pred.movedim(1, -1).reshape(-1, pred.shape[1]), dim=1, eps=COS_EPS)
    t = F.normalize(target.movedim(1, -1).reshape(-1, target.shape[1]), dim=1, eps=COS_EPS)
    rows = torch.arange(p.shape[0], device=p.device)
    negatives = ntxent_negatives(p.shape[0], num_negatives, generator)
    if negatives is None:
        # All rows: the positive is on the diagonal of the full similarity matrix.
        return F.cross_entropy(p @ t.T / temperature, rows)
    negatives = negatives.to(p.device)
    positive = (p * t).sum(1, keepdim=True) / temperature
    negative = (p @ t[negatives].T / temperature).masked_fill(rows[:, None] == negatives[None, :], -math.inf)
    logits = torch.cat([positive, negative], dim=1)
    return F.cross_entropy(logits, torch.zeros_like(rows))


def _parse_spec(spec: str | Mapping[str, float]) -> dict[str, float]:
    if isinstance(spec, str):
        names = [part.strip() for part in spec.split("+")]
        if any(not name for name in names):
            raise ValueError(f"loss spec {spec!r}: empty term (expected e.g. 'mse+median_cos')")
        if len(set(names)) != len(names):
            raise ValueError(f"loss spec {spec!r}: a loss appears twice")
        weights = dict.fromkeys(names, 1.0)
    elif isinstance(spec, Mapping):
        weights = dict(spec)
    else:
        raise ValueError(f"loss spec must be a string like 'mse+median_cos' or a name → weight mapping, "
                         f"got {spec!r}")
    if not weights:
        raise ValueError("loss spec is empty")
    for name, weight in weights.items():
        loss_options(name)  # raises for unknown names
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight) \
                or weight < 0:
            raise ValueError(f"loss {name!r}: weight must be a finite number >= 0, got {weight!r}")
    if not any(weights.values()):
        raise ValueError(f"loss spec {spec!r}: all weights are zero")
    return {name: float(weight) for name, weight in weights.items()}


class Loss(nn.Module):
    """Σ weight · term(pred, target); `last_terms` holds each unweighted term of the last call."""

    def __init__(self, weights: Mapping[str, float], options: Mapping[str, Mapping[str, Any]],
                 seed: int | None = None):
        super().__init__()
        self.weights = dict(weights)
        self.options = {name: {**loss_options(name), **options.get(name, {})} for name in self.weights}
        # One generator for the stochastic terms makes a run's draws reproducible without
        # touching torch's global RNG.
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self._kwargs = {name: dict(opts) for name, opts in self.options.items()}
        for name, kwargs in self._kwargs.items():
            if "generator" in inspect.signature(LOSSES[name]).parameters:
                kwargs["generator"] = self.generator
        self._last: dict[str, Tensor] = {}

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        total = pred.new_zeros(())
        self._last = {}
        for name, weight in self.weights.items():
            term = LOSSES[name](pred, target, **self._kwargs[name])
            self._last[name] = term.detach()
            total = total + weight * term
        return total

    @property
    def last_terms(self) -> dict[str, float]:
        # Converted on access, so training steps that do not log do not synchronise a GPU.
        return {name: float(value) for name, value in self._last.items()}

    def extra_repr(self) -> str:
        return " + ".join(f"{w:g}·{name}" for name, w in self.weights.items())


def build_loss(spec: str | Mapping[str, float], options: Mapping[str, Mapping[str, Any]] | None = None,
               seed: int | None = None) -> Loss:
    """A `Loss` from `"mse"`, `"mse+median_cos"` (weights 1.0) or `{"mse": 0.3, "median_cos": 0.7}`.

    `options` maps a loss name in the spec to its options (`loss_options(name)`); `seed` seeds
    the negatives of `ntxent` (default: torch's global RNG).
    """
    weights = _parse_spec(spec)
    options = dict(options or {})
    for name, opts in options.items():
        if name not in weights:
            raise ValueError(f"options given for loss {name!r}, which is not in the spec "
                             f"({', '.join(weights)})")
        accepted = loss_options(name)
        unknown = sorted(set(opts) - set(accepted))
        if unknown:
            raise ValueError(f"loss {name!r}: unknown option(s) {', '.join(map(repr, unknown))}; "
                             f"accepted: {', '.join(accepted) or 'none'}")
        for key, value in opts.items():
            # Ranges are checked by the loss itself; the type is checked here, before any work.
            kind = type(accepted[key])
            if isinstance(value, bool) or not isinstance(value, numbers.Integral if kind is int else numbers.Real):
                raise ValueError(f"loss {name!r}: option {key!r} must be {kind.__name__}, got {value!r}")
    options = {name: {key: type(loss_options(name)[key])(value) for key, value in opts.items()}
               for name, opts in options.items()}
    return Loss(weights, options, seed)
