"""What each request costs the event loop while it holds the GIL, which the thread running the serving forward
waits for between two tensor ops (benchmarks/README.md, "Serving": the HTTP path)."""

from __future__ import annotations

import os
import re

import pytest

from app.middleware import new_request_id


def test_request_ids_are_unique_and_echoed(client):
    ids = [client.get("/healthz").headers["X-Request-ID"] for _ in range(50)]
    assert len(set(ids)) == 50
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert client.get("/healthz", headers={"X-Request-ID": "mine-1"}).headers["X-Request-ID"] == "mine-1"


def test_a_request_id_makes_no_system_call(monkeypatch):
    """`uuid4()` read 16 bytes from the kernel for each request; under load the loop was often switched out in that
    call with the GIL held (a sixth of its samples in one profile)."""

    def refuse(n: int) -> bytes:
        raise AssertionError("os.urandom called for a request id")

    monkeypatch.setattr(os, "urandom", refuse)
    assert new_request_id() != new_request_id()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_process_draws_a_prefix_of_its_own():
    """Several API processes forked from one parent (a process manager) must not hand out the same ids."""
    parent = [new_request_id() for _ in range(3)]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its ids, then out without running anything of pytest's
        try:
            os.write(write, ",".join(new_request_id() for _ in range(3)).encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 4096).decode().split(",")
    os.close(read)
    assert len(child) == 3 and child[0][:20] != parent[0][:20]
    assert not set(child) & set(parent + [new_request_id() for _ in range(3)])
