"""Mapping models f: φ(x) → φ(m(x)) between (B, C, H, W) feature maps, and their registry.

Every family is a `MappingModel` registered by name with its hyper-parameters and defaults
(`HPARAMS`); `build_model` validates a config against them before building anything.
Geometric manipulations can be factored out: `build_model(..., manipulation=m,
apply_transform=True)` wraps the model in `SpatialThenMap`, which applies the exact spatial
permutation of `m` to the input first, so the inner model learns only the change of content
(the reference's "apply" group).
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from featmap_ray.mapping.closed_form import SufficientStats, fit_procrustes, fit_ridge

MODELS: dict[str, type[MappingModel]] = {}

# rot90 turns from dim -2 (H) toward dim -1 (W): counter-clockwise on screen, like PIL's rotate.
_ROTATIONS = {"rotation_90": 1, "rotation_180": 2, "rotation_270": 3}
_FLIPS = {"mirror_h": -1, "mirror_v": -2}


def is_geometric(manipulation: str | None) -> bool:
    """True if the manipulation is an exact permutation of positions (`spatial_transform` acts)."""
    return manipulation in _ROTATIONS or manipulation in _FLIPS


def spatial_transform(x: Tensor, manipulation: str) -> Tensor:
    """The position permutation of a geometric manipulation on (..., H, W); identity otherwise."""
    if manipulation in _ROTATIONS:
        return torch.rot90(x, k=_ROTATIONS[manipulation], dims=(-2, -1))
    if manipulation in _FLIPS:
        return torch.flip(x, dims=(_FLIPS[manipulation],))
    return x


def register(name: str):
    """Class decorator: add a `MappingModel` family to `MODELS` under `name`."""

    def decorator(cls: type[MappingModel]) -> type[MappingModel]:
        if name in MODELS:
            raise ValueError(f"mapping model {name!r} is already registered")
        # Hyper-parameters are the keyword defaults of __init__ after (channels, height, width).
        params = list(inspect.signature(cls.__init__).parameters.values())[4:]
        hparams = {p.name: p.default for p in params if p.name != "manipulation"}
        if any(default is inspect.Parameter.empty for default in hparams.values()):
            raise TypeError(f"{cls.__name__}: every hyper-parameter needs a default")
        cls.name = name
        cls.HPARAMS = hparams
        MODELS[name] = cls
        return cls

    return decorator


class NotFittedError(RuntimeError):
    """A closed-form model was used before `fit(stats)`."""


class MappingModel(nn.Module):
    """Base class: maps (B, C, H, W) → (B, C, H, W) for one fixed (C, H, W).

    Subclasses implement `map`; their `__init__(channels, height, width, **hparams)` keyword
    defaults are the family's hyper-parameters, collected into `HPARAMS` by `register`.
    """

    name: ClassVar[str] = ""
    trainable: ClassVar[bool] = True
    closed_form: ClassVar[bool] = False
    needs_manipulation: ClassVar[bool] = False
    HPARAMS: ClassVar[dict[str, Any]] = {}

    def __init__(self, channels: int, height: int, width: int):
        super().__init__()
        self.channels, self.height, self.width = channels, height, width

    def forward(self, x: Tensor) -> Tensor:
        expected = (self.channels, self.height, self.width)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"{self.name}: expected input of shape (B, {', '.join(map(str, expected))}), "
                             f"got {tuple(x.shape)}")
        return self.map(x)

    def map(self, x: Tensor) -> Tensor:
        raise NotImplementedError


def _per_position(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Apply a channels-last function to every position of a (B, C, H, W) map."""
    return fn(x.movedim(1, -1)).movedim(-1, 1)


class _SharedAffine(MappingModel):
    """y = W x + b at every position (a 1×1 convolution); `proj` holds W and b."""

    def __init__(self, channels: int, height: int, width: int):
        super().__init__(channels, height, width)
        self.proj = nn.Linear(channels, channels)

    def map(self, x: Tensor) -> Tensor:
        return _per_position(self.proj, x)


@register("linear")
class LinearMap(_SharedAffine):
    """One affine map C→C shared by all positions (torch's default Linear init)."""


class _ClosedFormAffine(_SharedAffine):
    """A shared affine map whose W, b are solved by `fit(stats)` instead of trained."""

    trainable = False
    closed_form = True

    def __init__(self, channels: int, height: int, width: int):
        super().__init__(channels, height, width)
        self.proj.requires_grad_(False)
        # A buffer, so a saved state_dict remembers whether W, b are real.
        self.register_buffer("fitted", torch.tensor(False))

    def solve(self, stats: SufficientStats) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def fit(self, stats: SufficientStats) -> _ClosedFormAffine:
        """Set W, b from statistics of (input, target) rows, as the model sees its inputs."""
        if stats.channels != self.channels:
            raise ValueError(f"{self.name}.fit: stats have {stats.channels} channels, model has {self.channels}")
        weight, bias = self.solve(stats)
        self.proj.weight.copy_(weight)
        self.proj.bias.copy_(bias)
        self.fitted.fill_(True)
        return self

    def map(self, x: Tensor) -> Tensor:
        if not self.fitted:
            raise NotFittedError(f"{self.name}: call fit(stats) before using the model")
        return super().map(x)


@register("ridge")
class RidgeMap(_ClosedFormAffine):
    """Ridge regression on centred superpixel vectors (`closed_form.fit_ridge`)."""

    def __init__(self, channels: int, height: int, width: int, gamma: float = 1.0):
        super().__init__(channels, height, width)
        if not (math.isfinite(gamma) and gamma >= 0):
            raise ValueError(f"ridge: gamma must be a finite number >= 0, got {gamma!r}")
        self.gamma = gamma

    def solve(self, stats: SufficientStats) -> tuple[Tensor, Tensor]:
        return fit_ridge(stats, self.gamma)


@register("orthogonal_procrustes")
class ProcrustesMap(_ClosedFormAffine):
    """Orthogonal map plus intercept (`closed_form.fit_procrustes`)."""

    def solve(self, stats: SufficientStats) -> tuple[Tensor, Tensor]:
        return fit_procrustes(stats)


@register("additive")
class AdditiveMap(MappingModel):
    """y = x + δ with one learned C-vector δ shared by all positions."""

    def __init__(self, channels: int, height: int, width: int):
        super().__init__(channels, height, width)
        self.delta = nn.Parameter(torch.zeros(channels))

    def map(self, x: Tensor) -> Tensor:
        return x + self.delta.view(1, -1, 1, 1)


@register("local_nonshared_linear")
class LocalNonSharedLinear(MappingModel):
    """A separate affine map C→C at every position: H·W·(C² + C) parameters."""

    def __init__(self, channels: int, height: int, width: int):
        super().__init__(channels, height, width)
        self.weight = nn.Parameter(torch.empty(height, width, channels, channels))
        self.bias = nn.Parameter(torch.zeros(height, width, channels))
        # Xavier-uniform per position: each [C, C] slice has fan_in = fan_out = C.
        bound = math.sqrt(6.0 / (2 * channels))
        nn.init.uniform_(self.weight, -bound, bound)

    def map(self, x: Tensor) -> Tensor:
        return torch.einsum("hwoc,bchw->bohw", self.weight, x) + self.bias.permute(2, 0, 1)


def _check_dropout(name: str, dropout: float) -> None:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{name}: dropout must be in [0, 1), got {dropout!r}")


def _check_positive(name: str, **values: int) -> None:
    for key, value in values.items():
        if value < 1:
            raise ValueError(f"{name}: {key} must be >= 1, got {value!r}")


@register("mlp")
class MLPMap(MappingModel):
    """Per-position Linear(C→hidden) → ReLU → Dropout → Linear(hidden→C), shared weights."""

    def __init__(self, channels: int, height: int, width: int, hidden: int = 512, dropout: float = 0.2):
        super().__init__(channels, height, width)
        _check_positive("mlp", hidden=hidden)
        _check_dropout("mlp", dropout)
        self.net = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, channels)
        )

    def map(self, x: Tensor) -> Tensor:
        return _per_position(self.net, x)


@register("cnn")
class CNNMap(MappingModel):
    """Conv → BN → ReLU → Dropout2d → Conv → BN(C), as the reference (output batch-standardised
    then affinely rescaled by the last BatchNorm); receptive field 2·kernel_size − 1."""

    def __init__(self, channels: int, height: int, width: int, hidden: int = 512, dropout: float = 0.2,
                 kernel_size: int = 3):
        super().__init__(channels, height, width)
        _check_positive("cnn", hidden=hidden, kernel_size=kernel_size)
        _check_dropout("cnn", dropout)
        if kernel_size % 2 == 0:
            raise ValueError(f"cnn: kernel_size must be odd to keep H×W, got {kernel_size}")
        pad = kernel_size // 2
        self.net = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size, padding=pad),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Dropout2d(dropout),
            nn.Conv2d(hidden, channels, kernel_size, padding=pad),
            nn.BatchNorm2d(channels),
        )

    def map(self, x: Tensor) -> Tensor:
        return self.net(x)


@register("transformer")
class TransformerMap(MappingModel):
    """Positions as tokens: Linear(C→hidden) → post-LN encoder layers → Linear(hidden→C).

    `positional="none"` (the reference) is permutation-equivariant over positions, so it cannot
    learn a spatial permutation; `"learned"` adds a learned (H·W, hidden) embedding.
    """

    def __init__(self, channels: int, height: int, width: int, hidden: int = 512, num_layers: int = 4,
                 num_heads: int = 8, dropout: float = 0.2, positional: str = "none"):
        super().__init__(channels, height, width)
        _check_positive("transformer", hidden=hidden, num_layers=num_layers, num_heads=num_heads)
        _check_dropout("transformer", dropout)
        if hidden % num_heads:
            raise ValueError(f"transformer: hidden ({hidden}) must be divisible by num_heads ({num_heads})")
        if positional not in ("none", "learned"):
            raise ValueError(f"transformer: positional must be 'none' or 'learned', got {positional!r}")
        self.in_proj = nn.Linear(channels, hidden)
        self.pos_embed = None
        if positional == "learned":
            self.pos_embed = nn.Parameter(torch.empty(height * width, hidden))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        layer = nn.TransformerEncoderLayer(hidden, num_heads, dim_feedforward=2 * hidden, dropout=dropout,
                                           activation="relu", batch_first=True, norm_first=False)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.out_proj = nn.Linear(hidden, channels)

    def map(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.in_proj(x.flatten(2).transpose(1, 2))  # (B, H·W, hidden)
        if self.pos_embed is not None:
            tokens = tokens + self.pos_embed
        out = self.out_proj(self.encoder(tokens))
        return out.transpose(1, 2).reshape(b, c, h, w)


@register("identity")
class IdentityMap(MappingModel):
    """Baseline y = x (no parameters)."""

    trainable = False

    def map(self, x: Tensor) -> Tensor:
        return x


@register("spatial_only")
class SpatialOnlyMap(MappingModel):
    """Baseline y = spatial_transform(x, manipulation): the permutation alone, no learned part."""

    trainable = False
    needs_manipulation = True

    def __init__(self, channels: int, height: int, width: int, manipulation: str):
        super().__init__(channels, height, width)
        self.manipulation = manipulation

    def map(self, x: Tensor) -> Tensor:
        return spatial_transform(x, self.manipulation)


class SpatialThenMap(MappingModel):
    """y = inner(spatial_transform(x, manipulation)): the reference's geometric "apply" group.

    Closed-form inner models must be fitted on transformed inputs: accumulate
    `stats.update(model_input(model, x), y)`, then call `fit(stats)`.
    """

    def __init__(self, inner: MappingModel, manipulation: str):
        super().__init__(inner.channels, inner.height, inner.width)
        self.inner = inner
        self.manipulation = manipulation
        self.name = f"{inner.name}[{manipulation}]"

    @property
    def trainable(self) -> bool:  # type: ignore[override]
        return self.inner.trainable

    @property
    def closed_form(self) -> bool:  # type: ignore[override]
        return self.inner.closed_form

    def fit(self, stats: SufficientStats) -> SpatialThenMap:
        if not self.inner.closed_form:
            raise TypeError(f"{self.inner.name} is not a closed-form model; it has no fit()")
        self.inner.fit(stats)
        return self

    def map(self, x: Tensor) -> Tensor:
        return self.inner(spatial_transform(x, self.manipulation))


def unwrap(model: MappingModel) -> MappingModel:
    """The model that does the learned part (`inner` of `SpatialThenMap`, else the model)."""
    return model.inner if isinstance(model, SpatialThenMap) else model


def model_input(model: MappingModel, x: Tensor) -> Tensor:
    """What `unwrap(model)` sees for input x: use it to accumulate closed-form statistics."""
    return spatial_transform(x, model.manipulation) if isinstance(model, SpatialThenMap) else x


def model_hparams(name: str) -> dict[str, Any]:
    """The hyper-parameters of family `name` with their defaults (a copy)."""
    return dict(_family(name).HPARAMS)


def _family(name: str) -> type[MappingModel]:
    if name not in MODELS:
        raise ValueError(f"unknown mapping model {name!r}; registered: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def _coerce_hparam(name: str, key: str, value: Any, default: Any) -> Any:
    """`value` as the type of `default` (numpy scalars from Ray Tune included), or ValueError."""
    kind = type(default)
    if kind in (bool, str):
        ok = type(value) is kind
    else:  # int or float; an int is a fine float, a bool is neither
        ok = isinstance(value, numbers.Integral if kind is int else numbers.Real) and not isinstance(value, bool)
    if not ok:
        raise ValueError(f"{name}: hyper-parameter {key!r} must be {kind.__name__}, got {value!r}")
    return kind(value)


def build_model(name: str, channels: int, height: int, width: int, manipulation: str | None = None,
                apply_transform: bool = False, **hparams: Any) -> MappingModel:
    """Build family `name` for (C, H, W) feature maps; `hparams` override `model_hparams(name)`.

    `apply_transform=True` wraps the model in `SpatialThenMap(model, manipulation)` (needs a
    geometric manipulation). The result's `build_config` rebuilds it: `build_model(**m.build_config)`.
    """
    cls = _family(name)
    for key, value in (("channels", channels), ("height", height), ("width", width)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: {key} must be a positive int, got {value!r}")
    unknown = sorted(set(hparams) - set(cls.HPARAMS))
    if unknown:
        accepted = ", ".join(sorted(cls.HPARAMS)) or "none"
        raise ValueError(f"{name}: unknown hyper-parameter(s) {', '.join(map(repr, unknown))}; "
                         f"accepted: {accepted}")
    kwargs = {**cls.HPARAMS, **{k: _coerce_hparam(name, k, v, cls.HPARAMS[k]) for k, v in hparams.items()}}

    if cls.needs_manipulation:
        if manipulation is None:
            raise ValueError(f"{name}: needs a manipulation name")
        if apply_transform:
            raise ValueError(f"{name}: already applies the spatial transform; apply_transform must be False")
        kwargs["manipulation"] = manipulation
    if apply_transform and not is_geometric(manipulation):
        raise ValueError(f"{name}: apply_transform=True needs a geometric manipulation "
                         f"({', '.join([*_ROTATIONS, *_FLIPS])}), got {manipulation!r}")
    if (cls.needs_manipulation or apply_transform) and manipulation in ("rotation_90", "rotation_270") \
            and height != width:
        raise ValueError(f"{name}: {manipulation} turns a {height}×{width} map into {width}×{height}; "
                         "the target would not match")

    model: MappingModel = cls(channels, height, width, **kwargs)
    if apply_transform:
        model = SpatialThenMap(model, manipulation)
    model.build_config = {"name": name, "channels": channels, "height": height, "width": width,
                          "manipulation": manipulation, "apply_transform": apply_transform, **hparams}
    return model


def linear_weights(model: MappingModel) -> tuple[Tensor, Tensor] | None:
    """(W [C_out, C_in], b [C_out]) of a shared affine family (linear, ridge, procrustes), else None."""
    inner = unwrap(model)
    if not isinstance(inner, _SharedAffine):
        return None
    if isinstance(inner, _ClosedFormAffine) and not inner.fitted:
        raise NotFittedError(f"{inner.name}: call fit(stats) before reading its weights")
    return inner.proj.weight.detach(), inner.proj.bias.detach()


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter values (closed-form W, b count; they are frozen parameters)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
