"""Pure ASGI middleware (no BaseHTTPMiddleware, so streaming and contextvars are untouched):
request ids, request metrics, the Host and Origin checks and the request body cap."""

from __future__ import annotations

import itertools
import os
import re
import time
import uuid
from urllib.parse import urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import CrossOriginRefused, LoopbackOnly, PayloadTooLarge, UntrustedHost, problem
from .metrics import Metrics
from .security import is_loopback

_REQUEST_ID = re.compile(r"[\w.:-]{1,128}")


class _RequestIds:
    """Unique request ids, 32 hex digits: a random 80-bit prefix per process (drawn again in a forked child) and a
    counter. Not `uuid4()` per request: its `os.urandom` is a system call made holding the GIL, and under load the
    kernel often switched the event loop out right there, holding up the serving forward's thread as well."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._prefix = uuid.uuid4().hex[:20]
        self._counter = itertools.count()

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._counter) & 0xFFFFFFFFFFFF:012x}"


new_request_id = _RequestIds()


class RequestIdMiddleware:
    """Give each request an id (the client's `X-Request-ID` if sane), on `request.state.request_id` and
    echoed in the response, so a 500's `reference` can be found in the logs."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = Headers(scope=scope).get("x-request-id", "")
        request_id = given if _REQUEST_ID.fullmatch(given) else new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        await self.app(scope, receive, send_with_id)


class MetricsMiddleware:
    """Latency per (method, route template, status). Unmatched paths share one label, so scanners cannot
    blow up the series count."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # if the app raises, ServerErrorMiddleware (outside us) answers 500
        start = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.http_requests_in_flight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.http_requests_in_flight.dec()
            route = getattr(scope.get("route"), "path", None) or "<unmatched>"  # set by the router on match
            self.metrics.http_request_duration.labels(scope["method"], route, str(status)).observe(
                time.perf_counter() - start)


class RequestTooLarge(HTTPException):
    """Raised from `receive` once the body passes the cap. An HTTPException on purpose: FastAPI re-raises
    those unchanged while parsing a body (anything else becomes a 400)."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body larger than {limit} bytes")


class BodyLimitMiddleware:
    """413 for bodies over `max_bytes`: at once from Content-Length, else as soon as the streamed bytes pass
    the cap, so an oversized body is never read whole."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length")
        # over 18 digits it is over any cap
        digits = length.lstrip("0") if length is not None else ""  # int() refuses over 4300 digits, zeros included
        if length is not None and length.isascii() and length.isdigit() and (
                len(digits) > 18 or int(digits or "0") > self.max_bytes):
            request = Request(scope)
            response = problem(413, PayloadTooLarge.type, f"request body larger than {self.max_bytes} bytes",
                               request=request, headers={"Connection": "close"}, limit_bytes=self.max_bytes)
            return await response(scope, receive, send)
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise RequestTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)


STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
PROBES = frozenset({"/healthz", "/readyz"})  # answered whatever the Host
DEFAULT_PORTS = {"http": 80, "https": 443}


def split_host(value: str) -> tuple[str, int | None] | None:
    """A `Host` header as (lowercase name, port or None); None when malformed. IPv6 comes as `[::1]:8000`."""
    value = value.strip().lower()
    if value.startswith("["):
        name, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        port = rest[1:]
    else:
        name, _, port = value.partition(":") if value.count(":") == 1 else (value, "", "")
        if ":" in name:  # an unbracketed IPv6 address is not a valid Host header
            return None
    if port and not (port.isascii() and port.isdigit() and len(port) <= 5):  # int() refuses over 4300 digits
        return None
    name = name.rstrip(".")
    return (name, int(port) if port else None) if name else None


def host_allowed(name: str, patterns: list[str]) -> bool:
    """`*` matches any name, `*.example.com` any subdomain of example.com, anything else itself."""
    for pattern in patterns:
        pattern = pattern.strip().lower().strip("[]").rstrip(".")
        if pattern == "*" or name == pattern or (pattern.startswith("*.") and name.endswith(pattern[1:])):
            return True
    return False


class HostOriginMiddleware:
    """Two attacks a web page can make through its visitor's browser, refused before any routing:

    - DNS rebinding: a page on evil.example points its name at 127.0.0.1 and then reads the API as its
      own origin. The browser still sends `Host: evil.example`; a name outside `allowed_hosts` is a 400.
    - request forgery: a page anywhere submits a form (multipart, no CORS preflight) to the API. A POST,
      PUT, PATCH or DELETE that carries no API key and whose `Origin` is neither the API's own (same host
      and port as `Host`) nor one of `allowed_origins` (CORS) is a 403. A request that carries a key needed a
      preflight to send it, which only `allowed_origins` pass; clients other than browsers send no `Origin`.
    """

    def __init__(self, app: ASGIApp, allowed_hosts: list[str], allowed_origins: list[str], loopback_only: bool = False):
        self.app = app
        self.allowed_hosts = allowed_hosts
        # "*" opens CORS to scripts that bring a key; a keyless request still needs its origin listed by name.
        self.allowed_origins = {o.strip().rstrip("/").lower() for o in allowed_origins} - {"*"}
        self.loopback_only = loopback_only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.loopback_only and not _local_listener(scope.get("server")):
            # Auth off, yet reached on a network address (uvicorn started by hand with --host 0.0.0.0, a container
            # in embedded mode): the bind check of `spafit serve` was bypassed, so refuse here.
            response = problem(403, LoopbackOnly.type, "auth is off, so this service answers only on a loopback "
                               "address; run server mode (API keys), or set SPAFIT_INSECURE_BIND=true",
                               request=Request(scope))
            return await response(scope, receive, send)
        headers = Headers(scope=scope)
        host = split_host(headers.get("host", ""))
        if scope["path"] in PROBES and scope["method"] in ("GET", "HEAD"):
            pass  # orchestrators probe by IP (`Host: 10.1.2.3:8000`); these say nothing a rebound page could use
        elif host is None or not host_allowed(host[0], self.allowed_hosts):
            response = problem(400, UntrustedHost.type, "this service does not answer to that Host name; "
                               "an operator may add it to SPAFIT_ALLOWED_HOSTS", request=Request(scope))
            return await response(scope, receive, send)
        if (scope["method"] in STATE_CHANGING and not _carries_key(headers)
                and (host is None or not self._origin_ok(headers, host))):
            response = problem(403, CrossOriginRefused.type, "a state-changing request from another origin needs "
                               "an API key; an operator may allow the origin with SPAFIT_CORS_ORIGINS",
                               request=Request(scope))
            return await response(scope, receive, send)
        await self.app(scope, receive, send)

    def _origin_ok(self, headers: Headers, host: tuple[str, int | None]) -> bool:
        origin = headers.get("origin")
        if origin is None:  # not a browser, or an old one; modern ones also say where a request comes from
            return headers.get("sec-fetch-site", "same-origin").lower() in ("same-origin", "none")
        origin = origin.strip().rstrip("/").lower()
        if origin in self.allowed_origins:
            return True
        try:
            parts = urlsplit(origin)
            port = parts.port or DEFAULT_PORTS.get(parts.scheme)
        except ValueError:
            return False
        if parts.scheme not in DEFAULT_PORTS or not parts.hostname or parts.path or parts.query:
            return False  # "null" (sandboxed frames, file://), and anything that is not an origin
        name, host_port = host
        # Without a port in Host, the client used the scheme's default (a TLS proxy in front: https and 443).
        return parts.hostname.rstrip(".") == name and (port == host_port or (host_port is None and
                                                                              port == DEFAULT_PORTS[parts.scheme]))


def _local_listener(server: tuple[str, int | None] | list | None) -> bool:
    """Whether the socket a request arrived on is this machine's own: a loopback address or a Unix socket
    (no port). Unknown (no `server` in the scope) counts as local: the bind check is then the CLI's."""
    if not server:
        return True
    host, port = server[0], server[1]
    return port is None or is_loopback(str(host))


def _carries_key(headers: Headers) -> bool:
    """An API key header: only a script can set one, and only after a CORS preflight when cross-origin.
    (`Authorization: Basic` is not one: a browser may attach remembered Basic credentials by itself.)"""
    return "x-api-key" in headers or headers.get("authorization", "").lower().startswith("bearer ")
