"""A scripted HTTP server on 127.0.0.1 for the SDK's own logic (retries, backoff, stream reconnects,
timeouts), which the real service cannot be made to misbehave for on demand. Each request to a route
takes the next scripted reply (the last one repeats); every request is recorded."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    status: int = 200
    body: Any = None  # dict / list: JSON; bytes / str: as is
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds before answering (to provoke client timeouts)


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


class StubServer:
    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], list[Reply]] = {}
        self.requests: list[Seen] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one request per connection; a body without length ends at close

            def _serve(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                path = self.path.split("?")[0]
                stub.requests.append(Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                                          body, time.monotonic()))
                script = stub.routes.get((self.command, path))
                if not script:
                    reply = Reply(404, {"type": "about:blank", "title": "Not Found", "status": 404,
                                        "detail": f"no stub for {self.command} {path}"})
                else:
                    reply = script.pop(0) if len(script) > 1 else script[0]
                if reply.delay:
                    time.sleep(reply.delay)
                data = reply.body
                content_type = "application/json"
                if isinstance(data, dict | list):
                    data = json.dumps(data).encode()
                    if reply.status >= 400:
                        content_type = "application/problem+json"
                elif isinstance(data, str):
                    data, content_type = data.encode(), "text/plain"
                data = data or b""
                try:
                    self.send_response(reply.status)
                    headers = {"Content-Type": content_type, **reply.headers}
                    for k, v in headers.items():
                        self.send_header(k, v)
                    if "Content-Length" not in headers and headers["Content-Type"] != "text/event-stream":
                        self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
                    pass

            do_GET = do_POST = do_PUT = do_DELETE = _serve

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def add(self, method: str, path: str, *replies: Reply) -> StubServer:
        self.routes[(method, path)] = list(replies)
        return self

    def seen(self, method: str, path: str) -> list[Seen]:
        return [r for r in self.requests if r.method == method and r.path.split("?")[0] == path]

    def __enter__(self) -> StubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def sse(*events: tuple[int, str, dict[str, Any]], end: bool = False) -> bytes:
    """A text/event-stream body of (seq, type, data) events, optionally closed by the `end` event."""
    out = []
    for seq, kind, data in events:
        payload = json.dumps({"seq": seq, "type": kind, "data": data, "created_at": "2026-01-01T00:00:00Z"})
        out.append(f"id: {seq}\nevent: {kind}\ndata: {payload}\n\n")
    if end:
        out.append("event: end\ndata: {}\n\n")
    return "".join(out).encode()


def job_json(job_id: str = "00000000-0000-0000-0000-000000000001", status: str = "succeeded", **kw: Any) -> dict:
    body = {"id": job_id, "task": "t", "task_type": "single_label_classification", "base_model": "m",
            "status": status, "progress": None, "metrics": None, "error": None, "adapter_version": None,
            "attempts": 1, "cancel_requested": False, "method": {}, "hyperparameters": {},
            "train_dataset": "00000000-0000-0000-0000-0000000000aa", "validation_dataset": None, "text_fields": ["text"],
            "label_field": "label", "created_at": "2026-01-01T00:00:00Z", "started_at": None, "finished_at": None}
    body.update(kw)
    return body
