"""Job events are numbered 1, 2, 3, ... per job, whoever writes them: the worker's progress and the API's
cancel race for the next number on the real Postgres, and neither may fail or leave a gap. The live stream
(in-process here; with real API processes in tests/reliability/test_event_streams.py) sends them in order,
resumes after Last-Event-ID and refuses a malformed one with a 422."""

from __future__ import annotations

import threading
import uuid

import pytest
from sqlalchemy import select

from tests.api.helpers import unique_csv, upload


def _queued_job(client, key) -> uuid.UUID:
    client.app.state.send_job = lambda job_id: None  # no broker message: nothing else touches the job
    dataset = upload(client, unique_csv(), headers=key.headers)
    assert dataset.status_code == 201, dataset.text
    job = client.post("/v1/jobs", json={"task": f"events-{uuid.uuid4().hex[:8]}", "train_dataset": dataset.json()["id"]},
                      headers=key.headers)
    assert job.status_code == 202, job.text
    return uuid.UUID(job.json()["id"])


def test_concurrent_writers_get_consecutive_numbers_without_retrying(client, db, tenant_key):
    from app.models import JobEvent
    from app.services import events

    job_id = _queued_job(client, tenant_key("train"))
    writers, each = 6, 15
    start, errors = threading.Barrier(writers), []

    def write(w: int) -> None:
        start.wait()
        try:
            for i in range(each):
                events.append(db, job_id, "progress", {"writer": w, "i": i}, attempts=1)  # one try: no retry hides a race
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with db.session() as s:
        rows = s.execute(select(JobEvent.seq, JobEvent.data).where(JobEvent.job_id == job_id)
                         .order_by(JobEvent.seq)).all()
    assert [seq for seq, _ in rows] == list(range(1, len(rows) + 1))
    written = [(d["writer"], d["i"]) for _, d in rows if "writer" in d]
    assert sorted(written) == [(w, i) for w in range(writers) for i in range(each)]
    for w in range(writers):  # each writer's events in the order it wrote them
        assert [i for ww, i in written if ww == w] == list(range(each))


def test_cancel_while_the_worker_writes_events_is_never_a_server_error(client, db, tenant_key):
    from app.models import Job, utcnow
    from app.services import events

    key = tenant_key("train")
    job_id = _queued_job(client, key)
    with db.transaction() as s:  # as if a worker had claimed it (and beat: else the requeuer of any API process
        job = s.get(Job, job_id)  # on this database may take it for orphaned and re-send it mid-test)
        job.status, job.heartbeat_at = "running", utcnow()
    stop, errors = threading.Event(), []

    def worker_progress() -> None:
        i = 0
        try:
            while not stop.is_set():
                events.append(db, job_id, "progress", {"step": i}, attempts=1)
                i += 1
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=worker_progress) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        answers = [client.post(f"/v1/jobs/{job_id}/cancel", headers=key.headers).status_code for _ in range(20)]
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert answers == [200] * 20, answers  # each one flags the running job; none is a 500
    assert errors == []


# ------------------------------------------------------------------------------------- the live stream
def _sse_ids_and_events(text: str) -> tuple[list[int], list[str]]:
    ids = [int(line[4:]) for line in text.splitlines() if line.startswith("id: ")]
    names = [line[7:] for line in text.splitlines() if line.startswith("event: ")]
    return ids, names


def test_the_stream_of_a_finished_job_sends_every_event_then_end(client, tenant_key):
    key = tenant_key("train")
    job_id = _queued_job(client, key)
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=key.headers).status_code == 200
    r = client.get(f"/v1/jobs/{job_id}/events", headers={**key.headers, "Accept": "text/event-stream"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    ids, names = _sse_ids_and_events(r.text)
    assert ids == [1, 2] and names == ["status", "status", "end"]
    # Resumed after the first: only the second, then end. Last-Event-ID wins over `after`.
    r = client.get(f"/v1/jobs/{job_id}/events?after=0",
                   headers={**key.headers, "Accept": "text/event-stream", "Last-Event-ID": "1"})
    assert _sse_ids_and_events(r.text) == ([2], ["status", "end"])
    r = client.get(f"/v1/jobs/{job_id}/events", headers={**key.headers, "Accept": "text/event-stream",
                                                         "Last-Event-ID": ""})  # empty: as if absent
    assert _sse_ids_and_events(r.text)[0] == [1, 2]


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "2147483648", "1" * 100_000, " ", "1 2"])
def test_a_malformed_last_event_id_is_422(client, tenant_key, value):
    from tests.api.helpers import assert_problem

    key = tenant_key("train")
    job_id = _queued_job(client, key)
    for accept in ("text/event-stream", "application/json"):
        r = client.get(f"/v1/jobs/{job_id}/events", headers={**key.headers, "Accept": accept, "Last-Event-ID": value})
        body = assert_problem(r, 422, "invalid-input")
        assert body["field"] == "Last-Event-ID" and len(body["detail"]) < 300


@pytest.mark.parametrize("value,expected", [(None, None), ("", None), ("0", 0), ("17", 17), ("2147483647", 2147483647)])
def test_last_event_id_parsing(value, expected):
    from app.services.streams import parse_last_event_id

    assert parse_last_event_id(value) == expected


@pytest.mark.parametrize("value", ["\u0661\u0662", "\u00b2", "-0", "1e3", "0" * 11])
def test_last_event_id_refuses_non_ascii_digits_and_other_numbers(value):
    from app.errors import InvalidInput
    from app.services.streams import parse_last_event_id

    with pytest.raises(InvalidInput):
        parse_last_event_id(value)


def test_embedded_mode_counts_stream_slots_per_tenant_in_the_process():
    import asyncio

    from app.errors import TooManyStreams
    from app.services.streams import StreamSlots

    async def scenario() -> None:
        slots = StreamSlots(2)
        a, b = uuid.uuid4(), uuid.uuid4()
        held = [await slots.acquire(a), await slots.acquire(a)]
        with pytest.raises(TooManyStreams) as e:
            await slots.acquire(a)
        assert e.value.headers["Retry-After"]
        other = await slots.acquire(b)  # another tenant is not affected
        await held[0].release()
        await held[0].release()  # idempotent: frees one slot, not two
        held.append(await slots.acquire(a))
        with pytest.raises(TooManyStreams):
            await slots.acquire(a)
        assert slots.open_count(a) == 2 and slots.open_count(b) == 1
        await other.release()

    asyncio.run(scenario())


def test_with_redis_unreachable_streams_are_capped_per_process_instead_of_refused():
    import asyncio

    from app.errors import TooManyStreams
    from app.services.streams import StreamSlots
    from tests.live import free_port

    async def scenario() -> None:
        slots = StreamSlots(2, f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)  # nothing listens there
        tenant = uuid.uuid4()
        held = [await slots.acquire(tenant), await slots.acquire(tenant)]
        assert all(lease.local for lease in held)
        with pytest.raises(TooManyStreams):
            await slots.acquire(tenant)
        for lease in held:
            await lease.renew()  # nothing to renew in Redis: no error
            await lease.release()
        assert slots._local == {}
        slots.close()

    asyncio.run(scenario())


def test_a_client_that_stops_reading_is_dropped_and_its_slot_freed():
    """A write that waits longer than a slot lease ends the stream (the client's buffers are full: it reads
    nothing), and the slot is given back; it does not stay open, uncounted, forever."""
    import asyncio
    import time

    from app.services.streams import EventStreamResponse, StreamSlots

    async def scenario() -> float:
        slots = StreamSlots(1, ttl=0.3)
        tenant = uuid.uuid4()
        lease = await slots.acquire(tenant)

        closed = []

        async def body():
            try:
                while True:
                    yield "event: progress\ndata: {}\n\n"
            finally:
                closed.append(True)

        async def receive() -> dict:
            await asyncio.Event().wait()  # the client never says it left
            return {}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.body":
                await asyncio.Event().wait()  # its socket buffer is full: the write never completes

        t = time.monotonic()
        await asyncio.wait_for(EventStreamResponse(body(), lease)(
            {"type": "http", "asgi": {"spec_version": "2.3"}}, receive, send), 10)
        assert slots.open_count(tenant) == 0
        assert closed  # the body was closed, not left for the garbage collector
        return time.monotonic() - t

    assert asyncio.run(scenario()) < 2
