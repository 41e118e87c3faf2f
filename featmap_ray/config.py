"""Typed run configuration: conf/*.yaml plus `key=value` overrides, validated before any work.

One `Config` object describes a whole run. Unknown keys and wrong types are rejected with the
dotted key path in the message (`ConfigError`), so a typo never silently falls back to a default.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from featmap_ray.manipulations import direct


class ConfigError(ValueError):
    """A configuration file or override that cannot be used."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RayConfig(_Strict):
    address: str | None = None  # None: RAY_ADDRESS if set, else an embedded local instance
    # Logical CPUs of the embedded instance. More than the physical cores on purpose: actor
    # pools plus Ray Data tasks deadlock when actors hold every logical CPU (ray#44687).
    num_cpus: int = Field(8, ge=1)
    object_store_memory_mb: int | None = Field(None, ge=75)


class MlflowConfig(_Strict):
    tracking_uri: str | None = None  # None: sqlite:///<storage>/mlflow.db
    experiment: str = "featmap"


class DatasetConfig(_Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$")
    # A folder (local path or URI such as s3://bucket/cars), or "builtin:skimage" for the
    # photographs bundled with scikit-image (the embedded demo).
    root: str
    layout: Literal["auto", "featmap", "split_folders", "imagefolder"] = "auto"
    splits: list[str] = ["train", "test"]
    default_split: str = "train"  # split given to images of a layout without split folders
    num_classes: int = Field(-1, ge=-1)  # first N classes in sorted order; -1 = all
    classes: list[str] | None = None  # explicit class subset (overrides num_classes)
    images_per_class: int | None = Field(None, ge=1)  # seeded sample per (split, class)
    seed: int = 0
    image_size: int = Field(288, ge=16)
    min_side: int = Field(32, ge=1)  # smaller images are recorded as errors, not upsampled
    max_pixels: int = Field(89_478_485, ge=1)  # PIL's default decompression-bomb limit
    extensions: list[str] = [".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"]

    @field_validator("root")
    @classmethod
    def _absolute_root(cls, root: str) -> str:
        return root if root.startswith("builtin:") or "://" in root else str(Path(root).expanduser().resolve())


class ManipulateConfig(_Strict):
    seed: int = 0  # base of the per-(source_id, manipulation) seeds
    batch_size: int = Field(16, ge=1)
    ops: dict[str, Any] = Field(
        default_factory=lambda: {
            "rotation": [90, 180, 270],
            "mirror": ["h", "v"],
            "noise": [40],
            "mask": direct.PAPER_MASKS,
            "hue_shift": [60],
            "grayscale": True,
        }
    )

    @field_validator("ops")
    @classmethod
    def _valid_ops(cls, ops: dict[str, Any]) -> dict[str, Any]:
        direct.expand(ops)  # raises ValueError naming the op and the bad value
        return ops

    def manipulations(self) -> list[direct.Manipulation]:
        return direct.expand(self.ops)


class BackboneRequest(_Strict):
    name: str  # a registry name (convnext_base, swinv2_base, dinov3_vitb16, resnet50) or any timm model
    layers: list[str] | None = None  # None: the registry's default layers
    pretrained: bool = True
    checkpoint: str | None = None  # local weight file; overrides the Hugging Face hub id
    model_kwargs: dict[str, Any] = {}  # passed to timm.create_model (tiny test variants)
    init_seed: int = 0  # seeds random initialisation when pretrained is false

    @model_validator(mode="after")
    def _checkpoint_needs_pretrained(self) -> BackboneRequest:
        if self.checkpoint and not self.pretrained:
            raise ValueError(f"backbone {self.name}: checkpoint is set but pretrained is false")
        return self


class ExtractConfig(_Strict):
    backbones: list[BackboneRequest] = [BackboneRequest(name="convnext_base")]
    batch_size: int = Field(32, ge=1)
    num_actors: int = Field(1, ge=1)
    num_gpus: float = Field(0.0, ge=0)  # per actor; 0 runs on CPU
    dtype: Literal["float16", "float32"] = "float16"
    torch_threads: int | None = Field(None, ge=1)  # CPU actors; None: all cores of the node
    rows_per_commit: int = Field(64, ge=1)  # rows per Lance fragment/commit: the resume granularity


class Config(_Strict):
    storage: str = "featmap_data"  # root of every table; a local folder or an object-store URI
    ray: RayConfig = RayConfig()
    mlflow: MlflowConfig = MlflowConfig()
    dataset: DatasetConfig
    manipulate: ManipulateConfig = ManipulateConfig()
    extract: ExtractConfig = ExtractConfig()

    @model_validator(mode="after")
    def _absolute_storage(self) -> Config:
        # Resolved once, here: Ray Tune trials and job working dirs change the process CWD.
        if "://" not in self.storage:
            self.storage = str(Path(self.storage).expanduser().resolve())
        return self

    def dump(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. extract.batch_size=8)")
        parsed.append((key.strip().split("."), yaml.safe_load(raw) if raw else None))
    return parsed


def _apply(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a section")
        node = child
    node[path[-1]] = value


def _format(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
            continue
        got = "" if isinstance(e.get("input"), dict) else f" (got {e.get('input')!r})"
        lines.append(f"  {key}: {e['msg'].removeprefix('Value error, ')}{got}")
    return "\n".join(lines)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config, apply `a.b=value` overrides (values parsed as YAML) and validate."""
    data: dict[str, Any] = {}
    source = "overrides"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    for keys, value in parse_overrides(overrides or []):
        _apply(data, keys, value)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format(e, source)) from None
