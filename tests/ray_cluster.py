"""Helpers for tests that run real servers on loopback: Ray nodes (`ray start --block`), the moto S3
server, an MLflow tracking server. Each is started as a child process of the test and stopped by
its PID together with every process it started, then checked gone.

Never `ray stop`, `pkill` or `killall`: they would take down every Ray (and other) process on the
machine, the test session's own embedded Ray and other people's test sessions included.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: `ray`, `mlflow`, and the `python` a job runs
MOTO_PYTHON = REPO / ".tools" / "moto" / "bin" / "python"  # `make setup`: moto[server] in a venv of its own

# Fake credentials for moto: every process that talks to the bucket gets them from its environment.
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                  "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _psutil():
    import psutil
    import ray  # noqa: F401  (puts Ray's vendored psutil on sys.path)

    return psutil


try:  # resolved here, not between fork and exec
    _PRCTL = ctypes.CDLL(None).prctl
except (AttributeError, OSError):
    _PRCTL = None


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """PR_SET_PDEATHSIG: the server gets SIGTERM when the test process dies without a teardown
    (`ray start --block` and `mlflow server` then stop what they started)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM, 0, 0, 0)


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without a Ray address, with the venv's bin first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


@dataclass
class Server:
    """A process started by this test (and what it starts in turn), stopped by PID."""

    name: str
    proc: subprocess.Popen
    log: Path
    # Processes started by the server that may leave its process tree (e.g. daemonised) but name
    # this marker (a temp dir) on their command line.
    marker: str | None = None
    ready: Callable[[], bool] | None = None  # True once the server serves
    stopped: list[str] = field(default_factory=list)  # what `stop` had to SIGKILL, for the record

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 180) -> None:
        """Until `ready`; a server that exits or times out is stopped, and the error names its log."""
        try:
            if self.ready is not None:
                wait_until(self.name, self.ready, timeout=timeout, servers=(self,))
        except BaseException:
            self.stop()
            raise

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} (pid {self.pid}) exited with {self.proc.returncode}:\n"
                               f"{self.log_text()[-5000:]}")

    def processes(self) -> list:
        """The server and its live descendants, and the processes naming the marker."""
        psutil = _psutil()
        found = {}
        if self.proc.poll() is None:  # once reaped, its PID may belong to anyone
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(self.pid)
                for p in [root, *root.children(recursive=True)]:
                    found[p.pid] = p
        if self.marker:
            me = psutil.Process()
            spared = {me.pid, *(p.pid for p in me.parents())}
            for p in psutil.process_iter(["cmdline"]):
                try:
                    if p.pid not in spared and any(self.marker in a for a in p.info["cmdline"] or []):
                        for q in [p, *p.children(recursive=True)]:
                            found.setdefault(q.pid, q)
                except psutil.Error:
                    pass
        return list(found.values())

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM to the server (it stops its children itself), then wait; whatever of the tree
        taken before the signal survives `grace` seconds is SIGKILLed. Raises if anything is left."""
        psutil = _psutil()
        tree = self.processes()  # before the signal: once the root exits its children are re-parented
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        _, alive = psutil.wait_procs(tree, timeout=5)
        alive += [p for p in self.processes() if p not in alive]
        for p in alive:
            with contextlib.suppress(psutil.Error):
                self.stopped.append(f"{p.pid} {p.name()}")
                p.kill()
        _, alive = psutil.wait_procs(alive, timeout=10)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        left = []
        for p in [*alive, *self.processes()]:
            with contextlib.suppress(psutil.Error):
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(p)
        if left:
            raise RuntimeError(f"{self.name}: processes still alive after SIGKILL: {left}")


def start_server(name: str, cmd: list[str], *, env: dict[str, str], cwd: Path, log: Path,
                 marker: str | None = None, ready: Callable[[], bool] | None = None) -> Server:
    """Start `cmd` (stdout and stderr to `log`); `Server.wait_ready` waits for `ready`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent)
    return Server(name, proc, log, marker, ready)


def wait_until(what: str, ready: Callable[[], bool], *, timeout: float, servers: tuple[Server, ...] = (),
               interval: float = 0.5) -> None:
    """Poll `ready` until it returns True (exceptions count as not yet); fails early, with its log,
    when one of `servers` exits."""
    deadline = time.monotonic() + timeout
    while True:
        for s in servers:
            s.check_alive()
        with contextlib.suppress(Exception):
            if ready():
                return
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {s.name} log:\n{s.log_text()[-5000:]}" for s in servers)
            raise TimeoutError(f"{what}: not ready after {timeout:.0f} s\n{logs}")
        time.sleep(interval)


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status == 200


# -- Ray ---------------------------------------------------------------------------------------------

def ray_env(**extra: str) -> dict[str, str]:
    """Environment for `ray start` and `ray` CLI commands of a cluster of the test's own: token auth
    with a token of its own (the same whether or not ~/.ray/auth_token exists: Ray >= 2.60 `ray
    start` turns auth on only when it does), no usage stats, no drain wait on SIGTERM."""
    return clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0",
                     # `ray start --block` drains its node for up to 30 s on SIGTERM: nothing to drain here.
                     RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0", **extra)


def ray_temp_dir(prefix: str) -> str:
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")  # short: Ray's unix socket paths live in it


@dataclass
class RayNode:
    server: Server
    temp_dir: Path
    gcs_address: str | None = None  # host:port, head only
    dashboard: str | None = None  # http://host:port, head only

    def wait_ready(self, timeout: float = 180) -> None:
        try:
            self.server.wait_ready(timeout)
        except BaseException:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            raise

    def stop(self) -> None:
        try:
            self.server.stop()
        finally:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def _node_ports() -> list[str]:
    # Fixed defaults (the agent's 52365, metrics) are taken by any other Ray on this machine: the node
    # then starts but accepts no job. Worker ports: let the OS pick (min = max = 0), not 10002-19999.
    agent, agent_grpc, runtime_env, metrics, node_manager, object_manager = free_ports(6)
    return [f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
            f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
            "--min-worker-port=0", "--max-worker-port=0"]


def _block_printed(log: Path) -> Callable[[], bool]:
    # `ray start --block` prints this once the node's processes are up.
    return lambda: "block forever" in log.read_text(errors="replace")


def start_head(env: dict[str, str], *, cwd: Path, num_cpus: int, resources: dict[str, float] | None = None,
               wait: bool = True) -> RayNode:
    """`ray start --head --block` with free ports and a temp dir of its own, in `env` (see `ray_env`)."""
    temp_dir = ray_temp_dir("fmh-")
    gcs, dashboard, client, dash_metrics, autoscaler_metrics = free_ports(5)
    env = {**env, "DASHBOARD_METRIC_PORT": str(dash_metrics), "AUTOSCALER_METRIC_PORT": str(autoscaler_metrics)}
    cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}", *_node_ports(),
           f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    if resources:
        cmd.append(f"--resources={json.dumps(resources)}")
    log = Path(temp_dir) / "ray-start.log"
    server = start_server("ray head", cmd, env=env, cwd=cwd, log=log, marker=temp_dir, ready=_block_printed(log))
    # The GCS listens on every interface; Ray resolves a loopback node address to this host's IP.
    node = RayNode(server, Path(temp_dir), f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}")
    if wait:
        node.wait_ready()
    return node


def start_worker(env: dict[str, str], gcs_address: str, *, cwd: Path, num_cpus: int,
                 resources: dict[str, float] | None = None, wait: bool = True) -> RayNode:
    """`ray start --address=<gcs> --block`: another node on this machine, with a temp dir of its own."""
    temp_dir = ray_temp_dir("fmw-")
    cmd = [str(BIN / "ray"), "start", f"--address={gcs_address}", "--block", *_node_ports(),
           f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    if resources:
        cmd.append(f"--resources={json.dumps(resources)}")
    log = Path(temp_dir) / "ray-start.log"
    server = start_server("ray worker", cmd, env=env, cwd=cwd, log=log, marker=temp_dir, ready=_block_printed(log))
    node = RayNode(server, Path(temp_dir))
    if wait:
        node.wait_ready()
    return node


@contextlib.contextmanager
def ray_head(*, num_cpus: int = 8, cwd: Path | None = None) -> Iterator[tuple[RayNode, dict[str, str]]]:
    """A one-node cluster of the test's own; yields (head, environment for `ray` commands)."""
    env = ray_env()
    head = start_head(env, cwd=cwd or REPO, num_cpus=num_cpus)
    try:
        yield head, env
    finally:
        head.stop()


def ray_cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def ray_list(env: dict[str, str], address: str, kind: str, *filters: str, limit: int = 10_000) -> list[dict]:
    """`ray list <kind> --detail --format json` against the head's dashboard (Ray's state API)."""
    args = ["list", kind, "--address", address, "--detail", "--format", "json", f"--limit={limit}"]
    for f in filters:
        args += ["--filter", f]
    done = ray_cli(env, *args)
    if done.returncode != 0:
        raise RuntimeError(f"ray list {kind}: {done.stdout}{done.stderr}")
    return json.loads(done.stdout)


def submit(address: str, env: dict[str, str], *entrypoint: str, submission_id: str | None = None,
           timeout: float = 600) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir <repo> -- <entrypoint>`: waits for the job, non-zero if it failed."""
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO)]
    if submission_id:
        cmd.append(f"--submission-id={submission_id}")
    cmd += ["--", *entrypoint]
    for _ in range(5):
        done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        # A freshly started head may not have registered its job agent yet (nothing was submitted).
        if "No available agent to submit job" not in done.stdout + done.stderr:
            return done
        time.sleep(5)
    return done


# -- object storage and tracking ---------------------------------------------------------------------

def start_moto(work: Path, *, port: int | None = None, wait: bool = True) -> tuple[Server, str]:
    """moto's S3 server on loopback (log and state in `work`), on `port` or a free one; returns
    (server, endpoint URL)."""
    if not MOTO_PYTHON.exists():
        raise FileNotFoundError(f"{MOTO_PYTHON} is missing: run `make setup` (it installs moto[server] there)")
    port = port or free_ports(1)[0]
    endpoint = f"http://127.0.0.1:{port}"
    server = start_server("moto", [str(MOTO_PYTHON), "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                          env=clean_env(), cwd=work, log=work / "moto.log",
                          ready=lambda: http_ok(f"{endpoint}/moto-api/"))
    if wait:
        server.wait_ready()
    return server, endpoint


def s3_env(endpoint: str) -> dict[str, str]:
    """The variables that point boto3, pyarrow.fs and Lance at `endpoint` with moto's fake credentials."""
    return {"AWS_ENDPOINT_URL": endpoint, **S3_CREDENTIALS}


def start_mlflow(work: Path, env: dict[str, str], artifacts: str, *, wait: bool = True) -> tuple[Server, str]:
    """`mlflow server` on loopback, its sqlite store in `work` and artefacts proxied to `artifacts`
    (credentials from `env`); returns (server, tracking URI)."""
    (port,) = free_ports(1)
    uri = f"http://127.0.0.1:{port}"
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}",
           "--artifacts-destination", artifacts, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    # No huey job runner (nor its /dev/shm folder): nothing here uses MLflow server jobs.
    server = start_server("mlflow", cmd, env={**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, cwd=work,
                          log=work / "mlflow.log", ready=lambda: http_ok(f"{uri}/health"))
    if wait:
        server.wait_ready()
    return server, uri
