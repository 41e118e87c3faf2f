"""Shared fixtures: one embedded Ray instance per test session, small configs, tiny backbones."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests import ray_cluster

# No hub access in tests: a pretrained request must fail fast instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")

# The S3 API server on loopback that the object-store tests use (started by `s3_server`), named
# through the standard AWS variables as a user's object store is: set now, before any Ray
# process starts, so that every Ray worker of the session inherits them. Tests never reach AWS.
# (Test modules import this file a second time as tests.conftest: the endpoint is chosen once. Each
# pytest-xdist worker has its own server, so the variable is per worker: a worker inherits the
# controller's environment.)
S3_ENDPOINT = os.environ.setdefault(f"FEATMAP_TEST_S3_ENDPOINT_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}",
                                    f"http://127.0.0.1:{ray_cluster.free_ports(1)[0]}")
os.environ.update(ray_cluster.s3_env(S3_ENDPOINT), AWS_EC2_METADATA_DISABLED="true")

# Random-weight variants of the registered architectures (same classes, smaller widths/depths).
TINY_BACKBONES = {
    "convnext_base": {"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]},
    "swinv2_base": {"embed_dim": 8, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]},
    "dinov3_vitb16": {"embed_dim": 16, "num_heads": 2, "depth": 12},
    "resnet50": {"layers": [1, 1, 1, 1]},
}


def tiny_backbone(name: str, **extra) -> dict:
    return {"name": name, "pretrained": False, "model_kwargs": TINY_BACKBONES[name], **extra}


@pytest.fixture(scope="module")
def single_torch_thread():
    """Tiny models gain nothing from a second OpenMP thread, and on a busy 2-core machine its
    barrier waits make each forward up to 30x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from featmap_ray.stages import runtime

    # 8 logical CPUs on 2 cores: actor pools next to Ray Data tasks starve otherwise (ray#44687).
    ray.init(address="local", num_cpus=8, include_dashboard=False, object_store_memory=768 * 2**20,
             log_to_driver=False)
    runtime.configure_data_context()
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server on loopback at S3_ENDPOINT, once per session, stopped by its PID."""
    server, endpoint = ray_cluster.start_moto(tmp_path_factory.mktemp("moto"), port=int(S3_ENDPOINT.rsplit(":", 1)[1]))
    yield endpoint
    server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A new, empty bucket on the loopback S3 server: its s3:// URI."""
    import boto3

    name = f"featmap-{secrets.token_hex(4)}"
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


def make_config(storage: Path, root: Path | str, **sections):
    """A Config for tests: small images, the given sections merged over test defaults."""
    from featmap_ray.config import Config

    data = {
        "storage": str(storage),
        "dataset": {"name": "t", "root": str(root), "image_size": 64, "min_side": 8},
        "manipulate": {"ops": {"rotation": [90], "noise": [40]}},
        "extract": {"backbones": [tiny_backbone("convnext_base", layers=["stage3"])], "batch_size": 4,
                    "rows_per_commit": 4},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return Config.model_validate(data)


def write_image(path: Path, size=(80, 60), seed=0, mode="RGB") -> np.ndarray:
    """A deterministic random-texture image file; returns its pixels."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).convert(mode).save(path)
    return arr


@pytest.fixture
def class_folders(tmp_path) -> Path:
    """FeatMap layout, 2 classes x (3 train + 1 test) images with colliding file names."""
    root = tmp_path / "data"
    seed = 0
    for cls in ("b_cls", "a_cls"):
        for split, n in (("train", 3), ("test", 1)):
            for i in range(n):
                write_image(root / "images" / split / cls / f"{i:05d}.png", seed=seed)
                seed += 1
    return root


def pytest_collection_modifyitems(config, items):
    """Every test that needs Ray, the S3 server or an MLflow server is `slow`: `make test-fast` (-m "not slow")
    is the library tests alone, and `make test` runs those on two pytest-xdist workers, then the slow ones in
    one process (two Ray instances on two cores slow every Ray test down far more than they gain)."""
    for item in items:
        if {"ray_session", "s3_server", "mlflow_server"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
