"""The FeatInv service under load and faults, over real HTTP on 127.0.0.1, bounded in time.

1. 1,000 requests, valid and invalid mixed, 32 at a time: no 5xx on a valid request, every invalid one
   a 4xx JSON answer naming the problem.
2. A FeatInv replica's actor is killed (`ray.kill`, found through Ray's named-actor listing) in the middle
   of a load run: Serve replaces it, the application stays healthy, and every request either succeeds or
   gets a retryable 503 (JSON, Retry-After). The counts are printed.
"""

import io
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import ray
import requests
from PIL import Image
from ray import serve

from featmap_ray.serve import deployments
from tests.conftest import make_config
from tests.ray_cluster import free_ports
from tests.test_serve import SHAPE, _npy

pytestmark = pytest.mark.usefixtures("ray_session")

CONCURRENCY = 32
TIMEOUT_S = 60  # per request: a stuck request fails the test instead of hanging it


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    cfg = make_config(tmp_path_factory.mktemp("store"), tmp_path_factory.mktemp("data"),
                      featinv={"base_model": "tiny", "encoder_hidden_channels": 16},
                      serve={"port": free_ports(1)[0], "steps": 1, "seeds": [100],
                             "featinv": {"num_replicas": 2, "max_batch_size": 32},
                             "backbone": {"max_batch_size": 32}, "ingress": {"max_ongoing_requests": 128}})
    url = deployments.start(cfg)
    yield cfg, url
    serve.shutdown()


def _requests() -> list[tuple[str, dict, bool]]:
    """(route, kwargs, valid): a cycle of valid uploads and every cheap kind of bad request."""
    rng = np.random.default_rng(0)
    maps = [_npy(rng.standard_normal(SHAPE).astype(np.float32)) for _ in range(4)]
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(buf, "PNG")
    image = buf.getvalue()
    nan = rng.standard_normal(SHAPE).astype(np.float32)
    nan[0, 0, 0] = np.nan
    valid = [("/reconstruct/features", {"data": m}, True) for m in maps] + [("/reconstruct", {"data": image}, True)]
    invalid = [
        ("/reconstruct", {"data": b"not an image"}, False),
        ("/reconstruct", {"data": image[:200]}, False),
        ("/reconstruct/features", {"data": _npy(nan)}, False),
        ("/reconstruct/features", {"data": _npy(np.zeros((32, 9, 9), np.float32))}, False),
        ("/reconstruct/features", {"data": maps[0], "params": {"seeds": list(range(9))}}, False),
        ("/reconstruct/features", {"data": maps[0], "params": {"model": "nope"}}, False),
    ]
    mixed = []
    for i in range(max(len(valid), len(invalid))):  # 5 valid, 6 invalid per round
        mixed += [valid[i]] if i < len(valid) else []
        mixed += [invalid[i]] if i < len(invalid) else []
    return mixed


def _send(url: str, route: str, kwargs: dict) -> tuple[int, dict, float]:
    kwargs = dict(kwargs)
    params = {"seeds": [7], **kwargs.pop("params", {})}
    if "data" in kwargs:  # raw bytes: the service takes only the content types it documents
        kwargs["headers"] = {"Content-Type": "application/octet-stream"}
    started = time.perf_counter()
    try:
        response = requests.post(url + route, params=params, timeout=TIMEOUT_S, **kwargs)
    except requests.RequestException as e:  # counted as a failure, never raised out of the pool
        return -1, {"error": f"{type(e).__name__}: {e}"}, time.perf_counter() - started
    is_json = response.headers.get("content-type") == "application/json"
    body = response.json() if is_json else {}
    return response.status_code, {**body, "retry_after": response.headers.get("Retry-After")}, \
        time.perf_counter() - started


def _run(url: str, work: list[tuple[str, dict, bool]], on_done=None) -> list[tuple[bool, int, dict, float]]:
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        futures = [(valid, pool.submit(_send, url, route, kwargs)) for route, kwargs, valid in work]
        out = []
        for valid, future in futures:
            out.append((valid, *future.result()))
            if on_done is not None:
                on_done(len(out))
        return out


def _healthy(cfg, url: str, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        app = serve.status().applications.get(cfg.serve.app_name)
        if app is not None and app.status == "RUNNING" and all(
                d.status == "HEALTHY" for d in app.deployments.values()):
            return requests.get(url + "/health", timeout=10).status_code == 200
        time.sleep(1)
    return False


def test_a_thousand_mixed_requests_at_concurrency_32(service):
    cfg, url = service
    cycle = _requests()
    work = [cycle[i % len(cycle)] for i in range(1000)]
    started = time.perf_counter()
    results = _run(url, work)
    seconds = time.perf_counter() - started
    valid = [(status, body) for ok, status, body, _ in results if ok]
    invalid = [(status, body) for ok, status, body, _ in results if not ok]
    print(f"\n[load] {len(results)} requests ({len(valid)} valid, {len(invalid)} invalid) at concurrency "
          f"{CONCURRENCY} in {seconds:.1f} s: valid {sorted({s for s, _ in valid})}, "
          f"invalid {sorted({s for s, _ in invalid})}")
    assert all(status == 200 for status, _ in valid), [b for s, b in valid if s != 200][:3]
    assert all(400 <= status < 500 and body.get("error") for status, body in invalid), \
        [(s, b) for s, b in invalid if not 400 <= s < 500][:3]
    assert seconds < 240
    assert _healthy(cfg, url, within_s=10)


def test_killing_a_featinv_replica_mid_load_gives_successes_or_retryable_503s(service):
    cfg, url = service
    prefix = f"SERVE_REPLICA::{cfg.serve.app_name}#{deployments.deployment_name('default')}#"

    def replicas() -> set[str]:
        return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)}

    before = replicas()
    assert len(before) == 2
    victim = min(before)
    killed = []

    def kill_once(done: int) -> None:
        if done == 40 and not killed:  # mid-run: requests are in flight on both replicas
            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
            killed.append(time.perf_counter())

    rng = np.random.default_rng(1)
    work = [("/reconstruct/features", {"data": _npy(rng.standard_normal(SHAPE).astype(np.float32))}, True)
            for _ in range(300)]
    started = time.perf_counter()
    results = _run(url, work, kill_once)
    seconds = time.perf_counter() - started
    ok = sum(status == 200 for _, status, _, _ in results)
    retryable = [body for _, status, body, _ in results if status == 503]
    print(f"\n[fault] {len(results)} requests in {seconds:.1f} s, replica {victim} killed after 40: "
          f"{ok} succeeded, {len(retryable)} got a retryable 503")
    assert killed and ok + len(retryable) == len(results), \
        [(s, b) for _, s, b, _ in results if s not in (200, 503)][:3]
    assert all(body.get("error") and body["retry_after"] for body in retryable)
    assert _healthy(cfg, url, within_s=120)
    after = replicas()
    assert victim not in after and len(after) == 2  # Serve replaced it
    assert _send(url, *work[0][:2])[0] == 200
