"""A writer to kill (tests/test_publish.py): publishes a mapping run or a FeatInv ControlNet folder
through the project's own publishers, and stops half-way: once the first file of the new version is
written, it touches SIGNAL and sleeps until it is killed.

    python -m tests.publish_child run|model DEST PAYLOAD SIGNAL

PAYLOAD: the seed of the run's weights (`run_payload`), or the local ControlNet folder to publish.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

SHAPE = (2, 3, 3)
NORM = {"mean": [0.5, -1.0], "std": [2.0, 3.0]}


def run_payload(seed: int):
    """A linear mapping run with weights drawn from `seed`, and its run.json."""
    import torch

    from featmap_ray.mapping import artefacts, grid

    spec = grid.RunSpec(dataset="d", group="g", backbone="b", layer="l", manipulation="m", model="linear",
                        loss_name="mse", loss={"mse": 1.0}, apply_transform=False, normalise=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = artefacts.build_mapping(spec, SHAPE, NORM)
    return model, {"spec": spec.to_dict(), "shape": list(SHAPE), "norm": NORM, "digest": f"seed {seed}"}


class StopAtSecondFile:
    """Wraps writers: the second file any of them writes first touches `signal` and sleeps, so the
    version holds one file when the test kills this process."""

    def __init__(self, signal: Path):
        self.signal, self.files = signal, 0

    def wrap(self, write):
        @functools.wraps(write)
        def wrapped(*args, **kwargs):
            if self.files:
                self.signal.touch()
                time.sleep(600)
            self.files += 1
            return write(*args, **kwargs)
        return wrapped


def main(kind: str, dest: str, payload: str, signal: Path) -> None:
    import pathlib
    import shutil

    import safetensors.torch

    # Everything imported before the writers are wrapped: only the publishing is stopped.
    from featmap_ray.io.files import Location
    from featmap_ray.mapping import artefacts
    from featmap_ray.stages.featinv_train import publish_controlnet

    where, stop = Location(dest), StopAtSecondFile(signal)
    if where.is_local:  # the version folder is written in place, by the artefact's own writers
        safetensors.torch.save_file = stop.wrap(safetensors.torch.save_file)  # model.safetensors
        pathlib.Path.write_text = stop.wrap(pathlib.Path.write_text)  # run.json
        shutil.copyfile = stop.wrap(shutil.copyfile)  # the ControlNet folder's files
    else:  # written to a temporary folder, then uploaded file by file
        Location.write_bytes = stop.wrap(Location.write_bytes)
    if kind == "run":
        artefacts.publish(where, *run_payload(int(payload)))
    else:
        publish_controlnet(where, payload)
    raise SystemExit(f"published {dest} completely: the test meant to kill this process half-way")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4]))
