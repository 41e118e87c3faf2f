"""Where work runs: connect to Ray (embedded local instance by default) and set Ray Data defaults."""

from __future__ import annotations

import logging
import os
import socket
import threading
import warnings
from collections.abc import Callable

from featmap_ray.config import Config

log = logging.getLogger(__name__)


def configure_data_context() -> None:
    import ray.data
    from ray.data._internal.tensor_extensions.arrow import FixedShapeTensorFormat

    ctx = ray.data.DataContext.get_current()
    # Canonical Arrow tensors (FixedSizeList storage), so non-Ray readers of our Lance tables work.
    ctx.arrow_fixed_shape_tensor_format = FixedShapeTensorFormat.ARROW_NATIVE
    ctx.execution_options.preserve_order = False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_ours: dict[str, str] = {}  # the environment variables this process set, and their values


def _set_env(name: str, value: str | None) -> None:
    """Set (None: unset) a variable that Ray's processes inherit, unless the user set it: a value
    set here for an earlier Ray of this process is replaced."""
    if name not in os.environ or os.environ[name] == _ours.get(name):
        if value is None:
            os.environ.pop(name, None)
            _ours.pop(name, None)
        else:
            os.environ[name] = _ours[name] = value


# The commands that run Ray Train (directly or as a step): their embedded Ray needs the State API.
TRAINING = frozenset({"fit", "sweep", "featinv-train"})


def _explicit_token_auth() -> None:
    """A new local cluster uses token authentication unless RAY_AUTH_MODE says otherwise; left unset,
    Ray turns it on itself and warns that it did ("Token authentication is enabled for this Ray
    cluster"). Choose it explicitly, as Ray does (the variable, and Ray's cached config: ray is
    imported by now), so nothing changes but the warning. RAY_AUTH_MODE set by the user wins."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    try:
        from ray._private.authentication.authentication_token_setup import (
            _enable_token_auth,
        )
    except ImportError:  # another Ray version: only the warning comes back
        return
    _enable_token_auth()


def _local_instance_settings(cfg: Config, state_api: bool) -> dict:
    """The `ray.init` arguments of an embedded local instance, and the environment its processes
    inherit: each setting the cure of a warning Ray would otherwise print (what the user set wins)."""
    _explicit_token_auth()
    # The raylet expects at most min(cores, num_cpus) workers to start at once and warns at every
    # multiple of that ("N PYTHON worker processes have been started ... Nx the maximum expected
    # startup concurrency"). ray.num_cpus above the core count (the demo: 8 on 2 cores, for actor
    # pools next to Ray Data tasks) means that many workers are expected: the limit follows it.
    cores = os.cpu_count() or 1
    _set_env("RAY_worker_maximum_startup_concurrency",
             str(int(cfg.ray.num_cpus)) if cfg.ray.num_cpus and cfg.ray.num_cpus > cores else None)
    # Actors that load a model from MLflow or a diffusers folder draw download / loading bars for local
    # copies of a few files; forwarded by Ray, they interleave with the stage's own bar.
    _set_env("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    _set_env("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # Ray Train's PlacementGroupCleaner (one per training run) asks the State API every second
    # whether its controller lives: that needs the dashboard's API server (without it: "Failed to
    # query Ray Train Controller actor state", each second of each run) and, with no address given,
    # finds the cluster by scanning the machine ("Found multiple active Ray instances" when another
    # Ray runs there, and the cleaner's thread dies). So for training: the dashboard, on a port
    # chosen here and named to every process (127.0.0.1 only, behind the token).
    port = None
    if os.environ.get("RAY_API_SERVER_ADDRESS") in (None, _ours.get("RAY_API_SERVER_ADDRESS")):
        port = _free_port() if state_api else None
        _set_env("RAY_API_SERVER_ADDRESS", None if port is None else f"http://127.0.0.1:{port}")
    memory = cfg.ray.object_store_memory_mb
    return {"address": "local",  # always a new embedded instance, never a stray `ray start` head
            "num_cpus": cfg.ray.num_cpus, "include_dashboard": state_api, "dashboard_host": "127.0.0.1",
            "dashboard_port": port, "object_store_memory": None if memory is None else memory * 2**20}


def init_ray(cfg: Config, state_api: bool = False) -> bool:
    """Attach to `ray.address` / RAY_ADDRESS (a cluster, or the one `ray job submit` runs in),
    else start an embedded local Ray (`state_api`: with the dashboard's API server, which Ray Train
    needs). Safe to call twice: True when this call connected, False when Ray was already
    initialized in this process."""
    import ray

    if ray.is_initialized():
        configure_data_context()
        return False
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    kwargs = {"address": address} if address else _local_instance_settings(cfg, state_api)
    with warnings.catch_warnings():
        # Lance warns before every fork of a process that imported it. Ray starts its processes
        # (GCS, raylet, dashboard) with subprocess and a preexec_fn, so Python runs the fork hooks,
        # but each child execs at once and never touches Lance: those forks are safe.
        warnings.filterwarnings("ignore", message="lance is not fork-safe", category=UserWarning)
        ray.init(log_to_driver=True, ignore_reinit_error=True, **kwargs)
    log.info("Ray resources: %s", ray.cluster_resources())
    configure_data_context()
    return True


def shutdown_ray() -> None:
    import ray

    ray.shutdown()


def start_autoscaling_coordinator(timeout_s: float = 120) -> None:
    """Start the AutoscalingCoordinator actor that Ray Data and Ray Train share, and wait for it.

    Created by whichever uses it first; Ray Train's controllers give each request to it 5 s. When a
    controller creates it on a busy node, its worker takes longer to start, and every controller
    then logs "Failed to send resource request ... GetTimeoutError" with a traceback. Called before
    training runs start. Ray-internal: where a Ray version moved it, only the warning comes back."""
    import ray

    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
    except ImportError:
        return
    try:
        ray.get(get_or_create_autoscaling_coordinator().__ray_ready__.remote(), timeout=timeout_s)
    except Exception as e:  # not ready in time: training still runs, Ray Train retries its requests
        log.info("the AutoscalingCoordinator actor is not ready: %s", e)


def forward_worker_output() -> Callable[[], None]:
    """Make what Ray's workers print reach this driver, printed as Ray prints it (`featmap`'s console
    sends it to the command's log), also when this process's Ray was started with
    log_to_driver=False (as the test session's is). Returns the function that undoes it.

    Ray-internal (`ray._private`): the dispatcher of forwarded lines and the thread that feeds it,
    as `ray.init(log_to_driver=True)` sets them up."""
    import functools

    try:
        from ray._private import worker as ray_worker
        from ray._private.ray_logging import (
            global_worker_stdstream_dispatcher as dispatcher,
        )
    except ImportError:  # another Ray version: what ray.init set up stays as it is
        return lambda: None

    w = ray_worker.global_worker
    if (w.mode != ray_worker.SCRIPT_MODE or not hasattr(w, "gcs_log_subscriber")
            or any(name == "ray_print_logs" for name, _ in dispatcher.handlers)):
        return lambda: None  # not a driver, or forwarding already
    dispatcher.add_handler("ray_print_logs", functools.partial(
        ray_worker.print_to_stdstream, ignore_prefix=ray_worker._should_ignore_worker_log_prefix(w)))
    thread = getattr(w, "logger_thread", None)
    if thread is None or not thread.is_alive():  # ray.shutdown() stops and joins it
        w.logger_thread = threading.Thread(target=w.print_logs, name="ray_print_logs", daemon=True)
        w.logger_thread.start()
    return lambda: dispatcher.remove_handler("ray_print_logs")


def operator_progress_bars(show: bool) -> Callable[[], None]:
    """Ray Data draws a bar per dataset run and, by default, one per operator: `show` False keeps the
    first only (one bar per stage). Returns the function that undoes it."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    before = ctx.enable_operator_progress_bars
    ctx.enable_operator_progress_bars = show

    def undo() -> None:
        ctx.enable_operator_progress_bars = before

    return undo


def actor_device(use_gpu: bool, torch_threads: int | None = None):
    """The torch device of a model actor. On CPU, use `torch_threads` or all the node's cores: Ray sets
    OMP_NUM_THREADS to the actor's CPU count (1)."""
    import torch

    if not use_gpu:
        torch.set_num_threads(torch_threads or os.cpu_count() or 1)
    return torch.device("cuda" if use_gpu else "cpu")
