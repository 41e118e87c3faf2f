"""A mapping run's artefacts: the model it publishes, how to build it, and where it lives.

Every stage that uses a fitted run (evaluate, analyze, apply, reconstruct, the service) loads it
through `load_run`, never through the code that trained it. A published run is a versioned folder
(featmap_ray.io.files: local disk or an object store)

    <storage>/mapping/runs/<study>/<run key>/
        CURRENT                 the name of the published version
        v-<time>-<random>/
            model.safetensors   the best-by-validation model: raw features in, raw features out
            run.json            spec, digest, shape, normalisation, training means, history, best epoch

Readers resolve CURRENT once (`Location.current`) and read both files from that version, so they see
the old run or the new one, never half of one or a mix.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from torch import nn

from featmap_ray.config import Config
from featmap_ray.io.files import POINTER, Location
from featmap_ray.layout import Layout
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

def runs_root(cfg: Config) -> Location:
    return Layout(cfg.storage).runs(cfg.mapping.study)


def run_dir(cfg: Config, spec: RunSpec) -> Location:
    return runs_root(cfg) / spec.key


def read_info(directory: str | Location) -> dict[str, Any] | None:
    """The run.json of a published run, or None when the folder holds no finished run."""
    version = Location(directory).current()
    return None if version is None else (version / RUN_FILE).read_json()


def finished_runs(cfg: Config) -> list[Location]:
    return [p.parent for p in runs_root(cfg).glob(f"*/{POINTER}")]


# -- writing and reading a run ----------------------------------------------------------------------

def publish(out_dir: str | Location, model: NormalisedMap, info: dict[str, Any]) -> None:
    """Publish a finished run as a new version of `out_dir`: model.safetensors and run.json (a reader
    sees the old run or the new one, never half: see `Location.publish`)."""
    from safetensors.torch import save_file

    with Location(out_dir).publish() as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / MODEL_FILE))
        (tmp / RUN_FILE).write_text(json.dumps(info, indent=1, default=float))


def copy_run(source: str | Location, out_dir: str | Location) -> None:
    """The published version of the run at `source`, published as a whole to `out_dir` (like `publish`)."""
    version = published_version(source)
    with Location(out_dir).publish() as tmp:
        for name in (MODEL_FILE, RUN_FILE):
            (tmp / name).write_bytes((version / name).read_bytes())


def load_run(directory: str | Location) -> tuple[NormalisedMap, RunSpec, dict[str, Any]]:
    """A finished run's best model (raw -> raw features, in eval mode), its spec and its run.json."""
    from safetensors.torch import load

    version = published_version(directory)
    info = (version / RUN_FILE).read_json()
    spec = RunSpec.from_dict(info["spec"])
    model = build_mapping(spec, tuple(info["shape"]), info["norm"])
    model.load_state_dict(load((version / MODEL_FILE).read_bytes()))
    return model.eval(), spec, info


def published_version(directory: str | Location) -> Location:
    """The folder of the run's published version (both files come from it); FileNotFoundError when
    `directory` holds no finished run."""
    version = Location(directory).current()
    if version is None:
        raise FileNotFoundError(f"no finished mapping run in {directory} (no {POINTER}: never published, "
                                "or its publishing was interrupted)")
    return version
