"""A live event stream opened with a key that is revoked afterwards: it once went on delivering the job's events
until its maximum duration (10 minutes by default, up to a day), though every plain request of that key got 401
within a second (found by a stress hunt). The stream now ends at its next batch of events with `reconnect`
(reason `unauthorized`), and the event appended after the revocation never reaches it."""

from __future__ import annotations

import threading
import time

from .helpers import csv_bytes, upload


def test_a_revoked_keys_open_stream_ends_before_the_next_event(make_settings, db, tenant_key):
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.services import events

    app = create_app(make_settings(sse_max_duration_s=30, sse_ping_interval_s=1))
    with TestClient(app) as c:
        admin = tenant_key("admin")
        k = tenant_key("train", tenant=admin.tenant_id)
        ds = upload(c, csv_bytes(), headers=k.headers).json()["id"]
        app.state.send_job = lambda job_id: None  # held queued: only this test writes its events
        job = c.post("/v1/jobs", headers=k.headers, json={"task": "t", "train_dataset": ds,
                                                           "method": {"name": "spafit", "n1": 2, "n2": 4}}).json()["id"]
        lines: list[str] = []
        opened = threading.Event()

        def read() -> None:
            with c.stream("GET", f"/v1/jobs/{job}/events", headers={**k.headers, "Accept": "text/event-stream"}) as r:
                lines.append(f"status {r.status_code}")
                opened.set()
                for line in r.iter_lines():
                    lines.append(line)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert opened.wait(10)
        with db.transaction() as s:  # while the key is valid, events arrive
            events.append_in(s, job, "progress", {"before": 1})
        deadline = time.monotonic() + 10
        while not any('"before"' in line for line in lines) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any('"before"' in line for line in lines), lines
        assert c.delete(f"/v1/keys/{k.key_id}", headers=admin.headers).status_code == 200
        assert c.get(f"/v1/jobs/{job}", headers=k.headers).status_code == 401
        with db.transaction() as s:
            events.append_in(s, job, "progress", {"after_revocation": 42})
        reader.join(15)
        assert not reader.is_alive(), "the revoked key's stream did not end"
    assert lines[0] == "status 200"
    assert not [line for line in lines if "after_revocation" in line], "an event reached the revoked key's stream"
    assert "event: reconnect" in lines and any('"reason":"unauthorized"' in line for line in lines), lines[-6:]
