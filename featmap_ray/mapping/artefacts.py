"""A mapping run's artefacts: the model it publishes, how to build it, and where it lives.

Every stage that uses a fitted run (evaluate, analyze, apply, reconstruct, the service) loads it
through `load_run`, never through the code that trained it. A published run is a folder

    <storage>/mapping/runs/<study>/<run key>/
        model.safetensors   the best-by-validation model: raw features in, raw features out
        run.json            spec, digest, shape, normalisation, training means, history, best epoch

written atomically (a folder holding run.json is a finished run, never a half-written one).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from featmap_ray.config import Config
from featmap_ray.mapping.grid import RunSpec

MODEL_FILE = "model.safetensors"
RUN_FILE = "run.json"


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
    """The run's model for (C, H, W) maps, with the normalisation statistics `norm` (or none)."""
    from featmap_ray.mapping.models import build_model

    c, h, w = shape
    inner = build_model(spec.model, c, h, w, manipulation=spec.manipulation, apply_transform=spec.apply_transform,
                        **spec.hparams)
    return NormalisedMap(inner, None if norm is None else np.asarray(norm["mean"]),
                         None if norm is None else np.asarray(norm["std"]))


# -- where runs live --------------------------------------------------------------------------------

def runs_root(cfg: Config) -> Path:
    return Path(cfg.storage) / "mapping" / "runs" / cfg.mapping.study


def run_dir(cfg: Config, spec: RunSpec) -> Path:
    return runs_root(cfg) / spec.key


def read_info(directory: str | Path) -> dict[str, Any] | None:
    """The run.json of a published run, or None when the folder holds no finished run."""
    path = Path(directory) / RUN_FILE
    return json.loads(path.read_text()) if path.exists() else None


def finished_runs(cfg: Config) -> list[Path]:
    root = runs_root(cfg)
    return sorted(p.parent for p in root.glob(f"*/{RUN_FILE}")) if root.exists() else []


# -- writing and reading a run ----------------------------------------------------------------------

def publish(out_dir: str | Path, model: NormalisedMap, info: dict[str, Any]) -> None:
    """Write a finished run atomically: model.safetensors and run.json into a temporary folder
    next to `out_dir`, then one rename (a reader sees the old run or the new one, never half)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".tmp-"))
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / MODEL_FILE))
    (tmp / RUN_FILE).write_text(json.dumps(info, indent=1, default=float))
    _replace(tmp, out_dir)


def copy_run(source: str | Path, out_dir: str | Path) -> None:
    """A published run, copied as a whole to `out_dir` (atomically, like `publish`)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".tmp-"))
    shutil.copytree(source, tmp, dirs_exist_ok=True)
    _replace(tmp, out_dir)


def _replace(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)


def load_run(directory: str | Path) -> tuple[NormalisedMap, RunSpec, dict[str, Any]]:
    """A finished run's best model (raw -> raw features, in eval mode), its spec and its run.json."""
    from safetensors.torch import load_file

    info = read_info(directory)
    if info is None:
        raise FileNotFoundError(f"no finished mapping run in {directory} (missing {RUN_FILE})")
    spec = RunSpec.from_dict(info["spec"])
    model = build_mapping(spec, tuple(info["shape"]), info["norm"])
    model.load_state_dict(load_file(str(Path(directory) / MODEL_FILE)))
    return model.eval(), spec, info
