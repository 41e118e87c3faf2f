"""Versioned publishing (featmap_ray.io.files) of a mapping run and of a FeatInv ControlNet folder, on
a local folder and in an S3 bucket (moto's server on loopback): a writer SIGKILLed half-way through
a new version leaves the previous one readable byte for byte, readers never see the half version,
and the next publish completes, is read, and removes what the killed writer left."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from featmap_ray.config import Config
from featmap_ray.io.files import POINTER, Location
from featmap_ray.layout import Layout
from tests import publish_child
from tests.conftest import make_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "s3"])
def cfg(request, tmp_path) -> Config:
    """A config whose storage root is a local folder or a bucket."""
    storage = tmp_path / "store" if request.param == "local" else request.getfixturevalue("s3_bucket") + "/store"
    return make_config(storage, tmp_path, mlflow={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"})


@dataclass
class Artefact:
    """How the project publishes one kind of artefact, and what its consumers read back."""

    kind: str  # publish_child's first argument
    folder: Callable[[Config], Location]  # where it lives (featmap_ray.layout)
    payloads: dict[int, str]  # version -> publish_child's PAYLOAD
    publish: Callable[[Location, str], None]  # the project's publisher, in this process
    read: Callable[[Config, Location], dict[str, Any]]  # what a consumer loads: weights (and run.json's digest)
    expected: dict[int, dict[str, Any]]  # version -> what was published


def mapping_run() -> Artefact:
    from featmap_ray.mapping import artefacts

    def publish(dest: Location, payload: str) -> None:
        artefacts.publish(dest, *publish_child.run_payload(int(payload)))

    def read(cfg: Config, dest: Location) -> dict[str, Any]:
        assert artefacts.finished_runs(cfg) == [dest]
        model, _, info = artefacts.load_run(dest)
        return {**model.state_dict(), "digest": info["digest"]}

    expected = {n: {**publish_child.run_payload(n)[0].state_dict(), "digest": f"seed {n}"} for n in (1, 2)}
    return Artefact("run", lambda cfg: Layout(cfg.storage).run(cfg.mapping.study, "a-run"), {1: "1", 2: "2"},
                    publish, read, expected)


def featinv_model(tmp: Path) -> Artefact:
    """Two tiny FeatInv ControlNets (random weights, each perturbed by its own seed), saved as the
    training checkpoint holds them."""
    from featmap_ray.featinv import loading
    from featmap_ray.io import tracking
    from featmap_ray.stages.featinv_train import publish_controlnet

    base = loading.tiny_base_components()
    fresh = loading.build_featinv(base, feature_channels=4).controlnet
    payloads, expected = {}, {}
    for n in (1, 2):
        controlnet = copy.deepcopy(fresh)
        generator = torch.Generator().manual_seed(n)
        with torch.no_grad():
            for p in controlnet.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)
        controlnet.save_pretrained(tmp / f"controlnet{n}")
        payloads[n], expected[n] = str(tmp / f"controlnet{n}"), controlnet.state_dict()

    def read(cfg: Config, dest: Location) -> dict[str, Any]:
        with loading.local_folder(cfg, tracking.model_source(cfg, dest.uri)) as local:  # as featinv.controlnet
            return loading.load_featinv(local, base).controlnet.state_dict()

    return Artefact("model", lambda cfg: Layout(cfg.storage).featinv_controlnet("fit"), payloads,
                    publish_controlnet, read, expected)


@pytest.fixture(params=["run", "model"])
def artefact(request, tmp_path_factory) -> Artefact:
    return mapping_run() if request.param == "run" else featinv_model(tmp_path_factory.mktemp("controlnets"))


def same(got: dict[str, Any], want: dict[str, Any]) -> bool:
    """Loaded weights equal the published ones exactly (they are copied, not recomputed)."""
    return got.keys() == want.keys() and all(
        torch.equal(got[k], want[k]) if isinstance(want[k], torch.Tensor) else got[k] == want[k] for k in want)


def files(folder: Location) -> dict[str, bytes]:
    with folder.local_copy() as local:
        return {p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*") if p.is_file()}


def start_writer(artefact: Artefact, dest: Location, payload: str, tmp: Path) -> subprocess.Popen:
    """A process publishing `payload` to `dest`, returned once the new version holds one file."""
    stop, log = tmp / "half-written", tmp / "writer.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tests.publish_child", artefact.kind, dest.uri, payload,
                                 str(stop)], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while not stop.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the writer did not stop half-way (exit {proc.poll()}):\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    return proc


@pytest.mark.slow  # a writer process, killed
def test_a_writer_killed_half_way_leaves_the_previous_version(cfg, artefact, tmp_path):
    dest = artefact.folder(cfg)
    assert dest.current() is None
    artefact.publish(dest, artefact.payloads[1])
    first = dest.current()
    before = files(first)
    assert same(artefact.read(cfg, dest), artefact.expected[1])

    writer = start_writer(artefact, dest, artefact.payloads[2], tmp_path)
    [half] = [v for v in dest.iterdir() if v.name not in (POINTER, first.name)]
    assert len(files(half)) == 1  # the new version is half written ...
    assert dest.current() == first and same(artefact.read(cfg, dest), artefact.expected[1])  # ... and unseen
    os.kill(writer.pid, signal.SIGKILL)
    assert writer.wait(timeout=60) == -signal.SIGKILL

    assert dest.current() == first and files(first) == before  # byte for byte
    assert same(artefact.read(cfg, dest), artefact.expected[1])
    artefact.publish(dest, artefact.payloads[2])  # the next publish completes
    second = dest.current()
    assert second not in (first, half) and same(artefact.read(cfg, dest), artefact.expected[2])
    # The killed writer's folder is gone; the version just replaced stays for readers still reading it.
    assert [v.name for v in dest.iterdir()] == sorted([POINTER, first.name, second.name])
    assert files(first) == before
