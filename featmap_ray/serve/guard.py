"""The ingress's first line: what a request must be before any route sees it (ASGI middleware).

Checked from the headers, before anything is read:
- the Host header names this service (`allowed_hosts`): a page on another site that reaches the
  loopback service through DNS rebinding is refused (400);
- a browser's Origin, when sent, is this service: a cross-site POST is refused (403);
- a route that takes a body gets one of the content types it documents, so the "simple" requests a
  page on any site can make a browser send without a CORS preflight (text/plain, form-urlencoded, no
  Content-Type) are refused (415); a route that takes no body gets none (413), chunked or not;
- Content-Length is within `max_bytes` (413).
While the body streams in: its size (413, chunked bodies too) and its pace: after `grace_s` it must
have arrived at `min_rate` bytes/s on average, so a trickling upload (slowloris) is cut off (408).
The whole request, answer included, has `deadline_s` (504). Every answer gets `SECURITY_HEADERS`.

Refusals are JSON `{"error": ...}` like every other error of the API. Routes the app does not have
(404) or methods it does not allow (405 with Allow) are left to the app's router.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.routing import Match

LOOPBACK = ("127.0.0.1", "localhost", "::1")
WILDCARD = ("0.0.0.0", "::", "")
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",  # never render an answer as anything but its declared type
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",  # other sites cannot embed our answers (images, JSON)
}


class Refused(HTTPException):
    """A request refused while its body streams in (raised out of `receive`, answered by the app's handler)."""


def allowed_hosts(bind: str, extra: Iterable[str]) -> frozenset[str]:
    """Host names (no port) the service answers to: `extra`, the bind address and, when it is loopback or
    a wildcard, the loopback names (a wildcard bind also needs the names clients use, in `extra`)."""
    hosts = {host_name(h) for h in extra} | {host_name(bind)}
    if bind in LOOPBACK or bind in WILDCARD:
        hosts |= set(LOOPBACK)
    return frozenset(hosts - {""})


def host_name(value: str) -> str:
    """'Example.org:8000' -> 'example.org'; '[::1]:8000' -> '::1'; a bare IPv6 address stays whole."""
    value = value.strip().lower().rstrip(".")
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else ""
    if value.count(":") == 1:
        value = value.split(":")[0]
    return value


def media_type(headers: Headers) -> str:
    return headers.get("content-type", "").split(";")[0].strip().lower()


class RequestGuard:
    """ASGI middleware of the checks in the module doc. `body_types(method, path)` says which content types a
    route takes a body of (None: the route takes no body); `routes` matches a scope to the app's routes."""

    def __init__(self, app, *, hosts: frozenset[str], body_types: Callable[[str, str], tuple[str, ...] | None],
                 routes: Callable[[dict], bool], max_bytes: int, min_rate: float, grace_s: float,
                 deadline_s: float, limit_names: dict[str, str]):
        self.app, self.hosts, self.body_types, self.routes = app, hosts, body_types, routes
        self.max_bytes, self.min_rate, self.grace_s, self.deadline_s = max_bytes, min_rate, grace_s, deadline_s
        self.names = limit_names  # the config keys named in messages

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_secured(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers += [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()
                            if k.lower().encode() not in present]  # the page sets some of them itself
                message["headers"] = headers
            await send(message)

        refusal = self.refusal(scope)
        if refusal is not None:
            return await refusal(scope, receive, send_secured)
        try:
            await asyncio.wait_for(self.app(scope, self.paced(receive), send_secured), self.deadline_s)
        except TimeoutError:
            if started:  # part of an answer is out: all that can be done is to stop
                raise
            await _error(504, f"the request took longer than {self.names['deadline']} ({self.deadline_s} s)")(
                scope, receive, send_secured)

    def refusal(self, scope) -> JSONResponse | None:
        """The answer to a request refused from its headers, or None."""
        headers = Headers(scope=scope)
        host = host_name(headers.get("host", ""))
        if host not in self.hosts:
            return _error(400, f"Host header {headers.get('host', '')!r} is not this service's; allowed: "
                               f"{sorted(self.hosts)} ({self.names['hosts']})")
        origin = headers.get("origin")
        if origin is not None and host_name(urlsplit(origin).netloc) not in self.hosts:
            return _error(403, f"cross-origin request from {origin!r} refused ({self.names['hosts']})")
        if not self.routes(scope):
            return None  # the router answers: 404, or 405 with Allow
        types = self.body_types(scope["method"], _route_path(scope))
        length = headers.get("content-length", "")
        has_body = "transfer-encoding" in headers or (length not in ("", "0"))
        if types is None:
            return _error(413, "this route takes no request body") if has_body else None
        kind = media_type(headers)
        if kind not in types:
            return _error(415, f"Content-Type {kind or '(none)'!r} is not accepted here; send one of {list(types)}")
        if length.isdigit() and int(length) > self.max_bytes:
            return _error(413, self.too_large())
        return None

    def too_large(self) -> str:
        return f"request body larger than {self.names['body']} ({self.max_bytes / 2**20:g} MiB)"

    def paced(self, receive):
        """`receive`, counting the body's bytes and timing them (see the module doc)."""
        start, received, done = None, 0, False

        async def paced_receive():
            nonlocal start, received, done
            if done:  # the body is in: later calls wait for a disconnect, unpaced
                return await receive()
            # From the route's first read: the time a request waits for a free slot is not the client's.
            start = time.monotonic() if start is None else start
            # The body must not fall behind grace_s + received / min_rate seconds after the start.
            wait = start + self.grace_s + received / self.min_rate - time.monotonic()
            try:
                message = await asyncio.wait_for(receive(), max(wait, 0.0))
            except TimeoutError:
                raise Refused(408, f"upload slower than {self.names['rate']} ({self.min_rate / 1024:g} KiB/s "
                                   f"after {self.grace_s:g} s): {received} bytes arrived") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                done = not message.get("more_body", False)
                if received > self.max_bytes:
                    raise Refused(413, self.too_large())
            return message

        return paced_receive


def _route_path(scope) -> str:
    """The path as the app's routes see it (without a Serve route prefix)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def matches_a_route(router) -> Callable[[dict], bool]:
    """Whether a request's method and path are one of the router's routes (Starlette's own matching)."""
    def matches(scope) -> bool:
        return any(route.matches(scope)[0] == Match.FULL for route in router.routes)

    return matches
