"""FeatInv service throughput: dynamic batching (`@serve.batch`) against the same deployments with max_batch_size=1,
or this code's service against another commit's (`--baseline REF`).

    .venv/bin/python benchmarks/serve_throughput.py                  # tiny models, CPU, a few minutes
    .venv/bin/python benchmarks/serve_throughput.py --concurrency 16 --requests 320 --steps 20
    .venv/bin/python benchmarks/serve_throughput.py --baseline 4965e15   # this code vs that commit's, batched

Measured in one run, over real HTTP on 127.0.0.1: the whole application (ingress, backbone, FeatInv)
is deployed twice side by side, with the backbone's and FeatInv's `max_batch_size` set to `--max-batch`
("batched", prefix /batched) and to 1 ("unbatched", prefix /unbatched); each answers `--requests`
POST /reconstruct/features requests (one seed each, distinct random maps) sent `--concurrency` at a
time, in `--rounds` rounds alternating between the two, after an untimed warm-up. Prints throughput,
p50/p95 latency of both and the throughput ratio. Tiny random models (the test backbone, 16×16 FeatInv)
on CPU: the ingress's per-request work (parsing, PNG encoding, metrics) is not batched and bounds
the ratio from above.

With `--baseline REF` the two sides are both batched: this working tree's application, and REF's
(checked out into a temporary `git worktree`, served by a child process with its own Ray whose
`featmap_ray` is REF's), in alternating rounds, so the ratio says what the changes since REF cost.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import requests

SHAPE = (64, 9, 9)
TINY_CONVNEXT = {"name": "convnext_base", "pretrained": False, "layers": ["stage3"],
                 "model_kwargs": {"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _merged(base: dict, update: dict) -> dict:
    """base with update's keys, nested dicts merged key by key."""
    merged = dict(base)
    for key, value in update.items():
        nested = isinstance(value, dict) and isinstance(base.get(key), dict)
        merged[key] = _merged(base[key], value) if nested else value
    return merged


def _config(storage: str, port: int, steps: int, max_batch: int, wait_s: float, overrides: dict | None = None):
    """The benchmark's service (tiny models on CPU), with `overrides` merged in (the GPU check's models and GPUs)."""
    from featmap_ray.config import Config

    batching = {"max_batch_size": max_batch, "batch_wait_timeout_s": wait_s, "max_ongoing_requests": 64}
    return Config.model_validate(_merged({
        "storage": storage, "dataset": {"name": "bench", "root": storage},
        "extract": {"backbones": [TINY_CONVNEXT]},
        "featinv": {"base_model": "tiny", "encoder_hidden_channels": 16},
        "serve": {"port": port, "steps": steps, "seeds": [100], "backbone": batching, "featinv": batching,
                  "ingress": {"max_ongoing_requests": 128}},
    }, overrides or {}))


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _load(url: str, bodies: list[bytes], concurrency: int) -> tuple[float, np.ndarray]:
    """Wall seconds for all bodies, and each request's latency; every answer must be 200."""
    def one(body: bytes) -> float:
        started = time.perf_counter()
        response = requests.post(url + "/reconstruct/features", data=body, params={"seeds": [1]}, timeout=600,
                                 headers={"Content-Type": "application/octet-stream"})
        response.raise_for_status()
        return time.perf_counter() - started

    with ThreadPoolExecutor(concurrency) as pool:
        started = time.perf_counter()
        latencies = list(pool.map(one, bodies))
        return time.perf_counter() - started, np.array(latencies)


def _serve_until_stdin_closes(args) -> None:
    """--serve-only: deploy the batched application with this process's featmap_ray, print its URL, wait."""
    import ray
    from ray import serve

    from featmap_ray.serve import deployments

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as storage:
        url = deployments.start(_config(storage, _free_port(), args.steps, args.max_batch, args.wait_s))
        print(f"URL {url}", flush=True)
        sys.stdin.read()
        serve.shutdown()
    ray.shutdown()


def _baseline(ref: str, args, work: str) -> tuple[subprocess.Popen, str]:
    """REF's application, served by a child process whose featmap_ray is REF's (a git worktree)."""
    repo = Path(__file__).resolve().parents[1]
    tree = Path(work) / "baseline"
    subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", str(tree), ref], check=True,
                   capture_output=True)
    child = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--serve-only", "--steps", str(args.steps),
         "--max-batch", str(args.max_batch), "--wait-s", str(args.wait_s)],
        cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True)
    for line in child.stdout:
        if line.startswith("URL "):
            return child, line.split()[1]
    raise RuntimeError(f"the baseline service of {ref} did not start (exit {child.wait()})")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps per reconstruction")
    parser.add_argument("--max-batch", type=int, default=16)
    # Long enough for a batch to fill between two waves of a closed loop of requests; one sampler call
    # of the tiny model at 20 steps takes ~0.5 s, so the wait costs little latency.
    parser.add_argument("--wait-s", type=float, default=0.2, help="batch_wait_timeout_s")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds per mode")
    parser.add_argument("--baseline", metavar="REF", help="compare with the service of this git commit")
    parser.add_argument("--serve-only", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def measure(args: argparse.Namespace, *, shape: tuple[int, int, int] = SHAPE,
            overrides: dict | None = None) -> dict[str, tuple[int, float, float, float]]:
    """{mode: (max_batch_size, req/s, p50 s, p95 s)} of the batched and unbatched applications (or, with
    args.baseline, of this code's and the baseline's); `shape`: the feature maps sent, `overrides`: merged into
    the config (the GPU check: real-shaped models, GPUs). Uses the Ray of this process if it has one."""
    import ray
    from ray import serve

    from featmap_ray.serve import deployments

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    rng = np.random.default_rng(0)
    bodies = [_npy(rng.standard_normal(shape).astype(np.float32)) for _ in range(args.requests)]
    modes = ({"current": args.max_batch} if args.baseline else {"batched": args.max_batch, "unbatched": 1})
    seconds = dict.fromkeys([*modes, *(["baseline"] if args.baseline else [])], 0.0)
    latencies: dict[str, list[np.ndarray]] = {mode: [] for mode in seconds}
    with tempfile.TemporaryDirectory() as storage:
        port = _free_port()
        urls = {}
        for mode, max_batch in modes.items():  # applications side by side, one route prefix each
            cfg = _config(storage, port, args.steps, max_batch, args.wait_s, overrides)
            cfg.serve.app_name, cfg.serve.route_prefix = mode, f"/{mode}"
            urls[mode] = deployments.start(cfg)
        child = None
        try:
            if args.baseline:
                child, urls["baseline"] = _baseline(args.baseline, args, storage)
            for url in urls.values():
                _load(url, bodies[: args.concurrency], args.concurrency)  # warm-up, untimed
            # Alternating rounds: both modes see the same machine (other work on a shared host comes and goes).
            for part in np.array_split(np.arange(args.requests), args.rounds):
                for mode, url in urls.items():
                    wall, lat = _load(url, [bodies[i] for i in part], args.concurrency)
                    seconds[mode] += wall
                    latencies[mode].append(lat)
        finally:
            serve.shutdown()
            if child is not None:
                child.communicate("")  # closes its stdin: it shuts its Ray down
            if args.baseline:
                subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[1]), "worktree", "remove",
                                "--force", str(Path(storage) / "baseline")], check=False, capture_output=True)
    if started:
        ray.shutdown()
    batch = {**modes, "baseline": args.max_batch}
    return {mode: (batch[mode], args.requests / seconds[mode], *np.percentile(np.concatenate(latencies[mode]), [50, 95]))
            for mode in seconds}


def main() -> None:
    args = parse_args()
    if args.serve_only:
        return _serve_until_stdin_closes(args)
    rows = measure(args)

    print(f"\nFeatInv service, tiny models on CPU ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores): {args.requests} requests at concurrency {args.concurrency}, "
          f"{args.steps} DDIM steps, 1 seed each")
    print(f"{'mode':<10} {'max_batch':>9} {'req/s':>8} {'p50 s':>7} {'p95 s':>7}")
    for mode, (max_batch, throughput, p50, p95) in rows.items():
        print(f"{mode:<10} {max_batch:>9} {throughput:>8.2f} {p50:>7.3f} {p95:>7.3f}")
    if args.baseline:
        print(f"throughput ratio current / baseline ({args.baseline}): {rows['current'][1] / rows['baseline'][1]:.3f}x")
    else:
        print(f"throughput ratio batched / unbatched: {rows['batched'][1] / rows['unbatched'][1]:.2f}x")

if __name__ == "__main__":
    main()
