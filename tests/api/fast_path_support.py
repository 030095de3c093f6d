"""Raw ASGI requests for the predict fast path's parity tests (test_fast_path_attacks*.py): full control of the
scope and of when each message of the body arrives, and an answer reduced to what a client reads."""

from __future__ import annotations

import json
from typing import Any


def answer(status: int | None, headers: dict[str, str], body: bytes) -> tuple:
    """What a client reads of a response, less what differs between two requests (the 500's reference)."""
    ctype = headers.get("content-type", "")
    parsed = json.loads(body) if ctype.endswith("json") and body else body
    if isinstance(parsed, dict):
        parsed.pop("reference", None)
        if isinstance(parsed.get("detail"), str) and "(ref " in parsed["detail"]:
            parsed["detail"] = parsed["detail"].split("(ref ")[0]
    names = ("content-type", "retry-after", "www-authenticate", "x-teapot", "connection")
    return status, {k: headers.get(k) for k in names}, parsed


async def asgi_request(app: Any, path: str, headers: list[tuple[str, str]], chunks: list[bytes], *,
                       root_path: str = "", server: tuple | None = ("testserver", 80), method: str = "POST",
                       disconnect_at: int | None = None, fail_at: int | None = None,
                       disconnect_after_body: bool = False, before: dict | None = None) -> tuple:
    """One raw ASGI request whose body comes in `chunks`; (status, headers, body). `disconnect_at` (an index):
    http.disconnect in place of that chunk and after; `fail_at`: `receive` raises there (a transport error);
    `disconnect_after_body`: http.disconnect 0.3 s after the body, else `receive` waits; `before` {index: async
    function} runs before that message is given. An exception that escapes the app is the server's plain 500."""
    import anyio

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": root_path + path, "raw_path": (root_path + path).encode(),
             "root_path": root_path, "query_string": b"", "server": server, "client": ("127.0.0.1", 5000),
             "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers], "state": {}}
    queue = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    if disconnect_at is not None:
        queue = queue[:disconnect_at] + [{"type": "http.disconnect"}]
    sent: list = []
    given = 0

    async def receive() -> dict:
        nonlocal given
        if before and given in before:
            await before.pop(given)()
        if fail_at is not None and given == fail_at:
            raise RuntimeError("connection reset by peer")
        if queue:
            given += 1
            return queue.pop(0)
        if disconnect_at is not None:
            return {"type": "http.disconnect"}
        if disconnect_after_body:
            await anyio.sleep(0.3)
            return {"type": "http.disconnect"}
        await anyio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    with anyio.fail_after(60):
        try:
            await app(scope, receive, send)
        except Exception:  # the server answers what was sent, else its own plain 500
            if not any(m["type"] == "http.response.start" for m in sent):
                sent[:] = [{"type": "http.response.start", "status": 500,
                            "headers": [(b"content-type", b"text/plain; charset=utf-8")]},
                           {"type": "http.response.body", "body": b"Internal Server Error"}]
    start = next((m for m in sent if m["type"] == "http.response.start"), None)
    status = start["status"] if start else None
    hdrs = {k.decode().lower(): v.decode() for k, v in start["headers"]} if start else {}
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, hdrs, body


def raw(client: Any, path: str, headers: list[tuple[str, str]], chunks: list[bytes], **kw: Any) -> tuple:
    """`asgi_request` on a TestClient's app, on its event loop."""
    return client.portal.call(lambda: asgi_request(client.app, path, headers, chunks, **kw))


def never_answering(client: Any, monkeypatch: Any) -> list[bool]:
    """Make `client`'s `Serving.predict` wait for ever; the list it returns gets True once the wait is cancelled."""
    import asyncio

    cancelled: list[bool] = []

    async def slow(*args: Any, **kwargs: Any) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    monkeypatch.setattr(client.serving, "predict", slow)
    return cancelled
