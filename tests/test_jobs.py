"""`ray job submit` end to end, as a user runs it: a `ray start` head on loopback, `jobs/pipeline.py`
submitted with `--working-dir .`, the Lance tables read back without Ray."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lance
import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: `ray`, and the `python` the job runs
TINY_CONVNEXT = ("[{name: convnext_base, layers: [stage3], pretrained: false, "
                 "model_kwargs: {depths: [1,1,1,1], dims: [8,16,32,64]}}]")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _kill_head(temp_dir: str) -> None:
    """Stop only the head started with `--temp-dir=temp_dir` (never `ray stop`: that would also
    take down other Ray instances on this machine, the test session's own included)."""
    import ray  # noqa: F401  (puts Ray's vendored psutil on sys.path)
    import psutil

    me = psutil.Process()
    spared = {me.pid, *(p.pid for p in me.parents())}
    procs: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid not in spared and any(temp_dir in a for a in p.info["cmdline"] or []):
                # Workers and agents rename themselves (ray::IDLE, ray::DashboardAgent): take the
                # descendants of the processes that still name the temp dir.
                for q in [p, *p.children(recursive=True)]:
                    procs.setdefault(q.pid, q)
        except psutil.Error:
            pass
    for sig, grace in (("terminate", 5), ("kill", 20)):  # raylet/GCS may take longer to drain than that
        for p in procs.values():
            try:
                getattr(p, sig)()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(list(procs.values()), timeout=grace)
        procs = {p.pid: p for p in alive}
        if not procs:
            break


@pytest.fixture
def ray_head():
    """A `ray start --head` cluster of its own (free ports, its own temp dir and auth token);
    yields (dashboard address, environment for `ray` commands, temp dir)."""
    temp_dir = tempfile.mkdtemp(prefix="fmjob-", dir="/tmp")  # short: Ray's unix socket paths live in it
    gcs, dashboard, agent, client, dash_metrics, autoscaler_metrics = _free_ports(6)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        # Token auth on both sides with a token of this test's own: the same whether or not
        # ~/.ray/auth_token exists (Ray >= 2.60 `ray start` turns auth on only when it does).
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        RAY_USAGE_STATS_ENABLED="0",
        DASHBOARD_METRIC_PORT=str(dash_metrics),  # fixed defaults, taken by any other head here
        AUTOSCALER_METRIC_PORT=str(autoscaler_metrics),
    )
    try:
        start = subprocess.run(
            [str(BIN / "ray"), "start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard}",
             # The agent's default port 52365 is already bound by any other Ray on this machine
             # (e.g. the test session's embedded one): the head then starts but accepts no job.
             f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
             "--num-cpus=8", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
            env=env, capture_output=True, text=True, timeout=300,
        )
        assert start.returncode == 0, start.stdout + start.stderr
        yield f"http://127.0.0.1:{dashboard}", env, Path(temp_dir)
    finally:
        _kill_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(address: str, env: dict[str, str], *entrypoint: str) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir <repo> -- <entrypoint>`: waits for the job, non-zero if it failed."""
    cmd = [str(BIN / "ray"), "job", "submit", "--working-dir", str(REPO), "--", *entrypoint]
    for _ in range(5):
        done = subprocess.run(cmd, env={**env, "RAY_ADDRESS": address}, cwd=REPO, capture_output=True,
                              text=True, timeout=600)
        # A freshly started head may not have registered its job agent yet (nothing was submitted).
        if "No available agent to submit job" not in done.stdout + done.stderr:
            return done
        time.sleep(5)
    return done


@pytest.mark.slow
def test_pipeline_as_a_ray_job(ray_head, tmp_path):
    address, env, temp_dir = ray_head
    t0 = time.monotonic()
    done = _submit(address, env, "python", "jobs/pipeline.py", "--config", "conf/demo.yaml",
                   f"storage={tmp_path}", f"extract.backbones={TINY_CONVNEXT}", "dataset.images_per_class=1",
                   "manipulate.ops={rotation: [90], grayscale: true}")
    log = done.stdout + done.stderr
    print(f"pipeline job: {time.monotonic() - t0:.0f} s")
    assert done.returncode == 0, log
    assert "succeeded" in log

    images = lance.dataset(str(tmp_path / "images.lance")).to_table(columns=["source_id", "variant"]).to_pylist()
    originals = {r["source_id"] for r in images if r["variant"] == "original"}
    assert originals
    assert sorted((r["source_id"], r["variant"]) for r in images) == sorted(
        (s, v) for s in originals for v in ("original", "rotation_90", "grayscale"))

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
    done = _submit(address, env, "python", "jobs/ingest.py", "--config", "conf/demo.yaml")
    log = done.stdout + done.stderr
    assert done.returncode != 0, log
    assert "storage='featmap_data' is a relative path" in log and "storage=/absolute/path" in log
    assert not (unpacked / "featmap_data").exists()
