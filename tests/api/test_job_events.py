"""Job events are numbered 1, 2, 3, ... per job, whoever writes them: the worker's progress and the API's
cancel race for the next number on the real Postgres, and neither may fail or leave a gap."""

from __future__ import annotations

import threading
import uuid

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
    from app.models import Job
    from app.services import events

    key = tenant_key("train")
    job_id = _queued_job(client, key)
    with db.transaction() as s:  # as if a worker had claimed it
        s.get(Job, job_id).status = "running"
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
