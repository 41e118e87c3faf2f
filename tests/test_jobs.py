"""`ray job submit` end to end, as a user runs it: a `ray start` head on loopback, `jobs/pipeline.py`
submitted with `--working-dir .`, the Lance tables read back without Ray."""

from __future__ import annotations

import re
import time

import lance
import pytest

from tests.ray_cluster import ray_head as start_ray_head
from tests.ray_cluster import submit

TINY_CONVNEXT = ("[{name: convnext_base, layers: [stage3], pretrained: false, "
                 "model_kwargs: {depths: [1,1,1,1], dims: [8,16,32,64]}}]")


@pytest.fixture
def ray_head(tmp_path_factory):
    """A `ray start --head` cluster of its own (free ports, its own temp dir and auth token), stopped
    by PID; yields (dashboard address, environment for `ray` commands, temp dir)."""
    with start_ray_head(num_cpus=8, cwd=tmp_path_factory.mktemp("head")) as (head, env):
        yield head.dashboard, env, head.temp_dir


@pytest.mark.slow
def test_pipeline_as_a_ray_job(ray_head, tmp_path):
    address, env, temp_dir = ray_head
    t0 = time.monotonic()
    done = submit(address, env, "python", "jobs/pipeline.py", "--config", "conf/demo.yaml",
                   f"storage={tmp_path}", f"extract.backbones={TINY_CONVNEXT}", "dataset.images_per_class=1",
                   "manipulate.ops={rotation: [90], grayscale: true}", "edit.images_per_class={train: 1}")
    log = done.stdout + done.stderr
    print(f"pipeline job: {time.monotonic() - t0:.0f} s")
    assert done.returncode == 0, log
    assert "succeeded" in log

    images = lance.dataset(str(tmp_path / "images.lance")).to_table(
        columns=["source_id", "variant", "split", "class_name"]).to_pylist()
    originals = [r for r in images if r["variant"] == "original"]
    assert originals
    # conf/demo.yaml's semantic edits: one train original per class, each with both prompts.
    edited = {r["source_id"] for r in images if r["variant"].startswith("qwen:")}
    assert sorted((r["class_name"], r["split"]) for r in originals if r["source_id"] in edited) == sorted(
        (c, "train") for c in {r["class_name"] for r in originals if r["split"] == "train"})
    assert sorted((r["source_id"], r["variant"]) for r in images) == sorted(
        [(r["source_id"], v) for r in originals for v in ("original", "rotation_90", "grayscale")]
        + [(s, v) for s in edited for v in ("qwen:Warm_light:0", "qwen:Add_snow:0")])

    features = lance.dataset(str(tmp_path / "features" / "convnext_base" / "stage3.lance")).to_table()
    assert sorted(zip(features["source_id"].to_pylist(), features["variant"].to_pylist())) == sorted(
        (r["source_id"], r["variant"]) for r in images)
    assert features["feature"].combine_chunks().to_numpy_ndarray().shape == (len(images), 64, 9, 9)

    # What was uploaded (unpacked on the head): the sources, not the ignored .venv or tables.
    pkg = re.search(r"gcs://(_ray_pkg_[0-9a-f]+)\.zip", log).group(1)
    unpacked = temp_dir / "session_latest" / "runtime_resources" / "working_dir_files" / pkg
    assert (unpacked / "jobs" / "pipeline.py").is_file() and (unpacked / "featmap_ray" / "cli.py").is_file()
    assert not (unpacked / ".venv").exists() and not (unpacked / "featmap_data").exists()
    size = sum(f.stat().st_size for f in unpacked.rglob("*") if f.is_file())
    print(f"working dir upload: {size / 2**20:.2f} MiB unpacked")
    assert size < 20 * 2**20

    # A relative storage would land in the job's temporary working dir: refused before any work.
    done = submit(address, env, "python", "jobs/ingest.py", "--config", "conf/demo.yaml")
    log = done.stdout + done.stderr
    assert done.returncode != 0, log
    assert "storage='featmap_data' is a relative path" in log and "storage=/absolute/path" in log
    assert not (unpacked / "featmap_data").exists()
