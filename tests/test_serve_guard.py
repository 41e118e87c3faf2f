"""The service's RequestGuard on a small Starlette app of its own (the service's routes are tested over real HTTP in
tests/test_serve.py): the whole-request deadline, and the Host names it accepts."""

import asyncio

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from featmap_ray.serve import guard

NAMES = {"body": "max_body", "rate": "min_rate", "deadline": "deadline", "hosts": "hosts"}


def _app(deadline_s: float) -> Starlette:
    async def slow(request: Request) -> JSONResponse:
        await asyncio.sleep(float(request.query_params["s"]))
        return JSONResponse({"slept": True})

    app = Starlette(routes=[Route("/slow", slow)])
    app.add_middleware(guard.RequestGuard, hosts=guard.allowed_hosts("127.0.0.1", []), body_types=lambda m, p: None,
                       routes=guard.matches_a_route(app.router), max_bytes=1024, min_rate=1024.0, grace_s=1.0,
                       deadline_s=deadline_s, limit_names=NAMES)
    return app


def test_a_request_past_its_deadline_is_answered_504_and_one_within_it_is_served():
    client = TestClient(_app(deadline_s=0.5), base_url="http://127.0.0.1:8000")
    late = client.get("/slow", params={"s": 5})
    assert late.status_code == 504 and late.json() == {"error": "the request took longer than deadline (0.5 s)"}
    assert late.headers["x-content-type-options"] == "nosniff"
    assert client.get("/slow", params={"s": 0}).json() == {"slept": True}


@pytest.mark.parametrize("bind, extra, host, allowed", [
    ("127.0.0.1", [], "127.0.0.1:8000", True),
    ("127.0.0.1", [], "localhost:8000", True),
    ("127.0.0.1", [], "[::1]:8000", True),
    ("127.0.0.1", [], "LOCALHOST.", True),
    ("127.0.0.1", [], "attacker.example", False),
    ("127.0.0.1", [], "127.0.0.1.attacker.example:8000", False),
    ("10.0.0.5", [], "10.0.0.5:8000", True),
    ("10.0.0.5", [], "localhost:8000", False),  # bound to a private address only: loopback names are not it
    ("0.0.0.0", ["featmap.internal"], "featmap.internal:443", True),
    ("0.0.0.0", ["featmap.internal"], "other.internal", False),
    ("127.0.0.1", [], "", False),
])
def test_the_hosts_a_service_answers_to(bind, extra, host, allowed):
    assert (guard.host_name(host) in guard.allowed_hosts(bind, extra)) is allowed
