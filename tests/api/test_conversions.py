"""The bound on PEFT conversions in an API process (`app/services/conversions.py`): one per tenant at a time,
a few in the process with the others waiting their turn (or refused past the wait or the queue), failures that
release their slot, and exports cached by content."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from app.errors import ServiceUnavailable, TooManyConversions
from app.services.conversions import Conversions


def _hold(conv: Conversions, tenant: uuid.UUID) -> tuple[threading.Event, threading.Event, threading.Thread]:
    """A conversion of `tenant` that runs until released: (entered, release, thread)."""
    entered, release = threading.Event(), threading.Event()

    def run() -> None:
        with conv.slot(tenant):
            entered.set()
            release.wait(10)

    t = threading.Thread(target=run)
    t.start()
    assert entered.wait(5)
    return entered, release, t


def test_a_tenant_runs_one_conversion_at_a_time_while_another_tenant_runs_its_own():
    conv = Conversions(in_flight=2, wait_s=5, cache_bytes=0)
    a, b = uuid.uuid4(), uuid.uuid4()
    _, release, t = _hold(conv, a)
    with pytest.raises(TooManyConversions) as err:
        with conv.slot(a):
            pass
    assert err.value.status == 429 and err.value.headers["Retry-After"] == "1"
    with conv.slot(b):  # another tenant is not held up by a's
        pass
    release.set()
    t.join()
    with conv.slot(a):  # a's slot is back once its conversion ended
        pass


def test_past_the_process_bound_a_conversion_waits_its_turn_then_gives_up_with_503():
    conv = Conversions(in_flight=1, wait_s=0.3, cache_bytes=0)
    _, release, t = _hold(conv, uuid.uuid4())
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable) as err:
        with conv.slot(uuid.uuid4()):
            pass
    assert 0.25 <= time.monotonic() - started < 3 and err.value.headers["Retry-After"] == "5"
    # a waiter gets the slot as soon as the running conversion ends
    conv.wait_s = 10
    got = threading.Event()

    def wait_then_run() -> None:
        with conv.slot(uuid.uuid4()):
            got.set()

    waiter = threading.Thread(target=wait_then_run)
    waiter.start()
    time.sleep(0.1)
    assert not got.is_set()  # still waiting: the slot is taken
    release.set()
    t.join()
    waiter.join(5)
    assert got.is_set()


def test_no_more_than_the_queue_wait_and_a_failed_conversion_releases_its_slot():
    conv = Conversions(in_flight=1, wait_s=10, cache_bytes=0, waiting=1)
    _, release, t = _hold(conv, uuid.uuid4())
    def wait_then_run() -> None:
        with conv.slot(uuid.uuid4()):
            pass

    second = threading.Thread(target=wait_then_run)
    second.start()
    deadline = time.monotonic() + 5
    while conv._queued < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable):  # one waiting already: refused at once, not after wait_s
        with conv.slot(uuid.uuid4()):
            pass
    assert time.monotonic() - started < 1
    release.set()
    t.join()
    second.join(5)
    assert not second.is_alive() and conv._running == conv._queued == 0
    conv = Conversions(in_flight=1, wait_s=1, cache_bytes=0)
    tenant = uuid.uuid4()
    with pytest.raises(ValueError):
        with conv.slot(tenant):
            raise ValueError("a bad archive")
    with conv.slot(tenant):  # neither the tenant's slot nor the process's was kept by the failure
        pass


def test_an_export_is_converted_once_per_content_and_the_cache_keeps_to_its_bytes():
    conv = Conversions(in_flight=2, wait_s=1, cache_bytes=100)
    calls: list[bytes] = []

    def convert(archive: bytes) -> bytes:
        calls.append(archive)
        return archive * 10  # 40 bytes for a 4-byte archive

    tenant = uuid.uuid4()
    assert conv.export(tenant, "sha-a", b"aaaa", convert) == b"a" * 40
    assert conv.export(uuid.uuid4(), "sha-a", b"aaaa", convert) == b"a" * 40
    assert calls == [b"aaaa"]
    conv.export(tenant, "sha-b", b"bbbb", convert)
    conv.export(tenant, "sha-c", b"cccc", convert)  # 120 bytes > 100: the least recently used (a) goes
    assert conv._cached <= 100 and list(conv._cache) == ["sha-b", "sha-c"]
    conv.export(tenant, "sha-big", b"x" * 20, convert)  # 200 bytes: never kept
    assert "sha-big" not in conv._cache


def test_running_and_waiting_conversions_never_hold_more_than_their_share_of_the_route_thread_pool():
    from app.services.conversions import MAX_THREADS

    for in_flight in (1, 2, 5, 16, 20):
        conv = Conversions(in_flight=in_flight, wait_s=1, cache_bytes=0)
        assert conv.in_flight + conv.waiting <= MAX_THREADS and conv.waiting <= 4 * in_flight
