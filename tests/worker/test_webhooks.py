"""Signed webhooks with real processes: the session's Celery worker delivers to a receiver on loopback (the live
worker allows private URLs and retries after 0.5 s, 1 s, ...: tests/live.py), signed per tenant, retried with
backoff, each attempt a job event; the API refuses URLs inside the network in server mode."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from tests.live import JOB_HYPERPARAMETERS, JOB_METHOD, wait_until
from tests.tiny import toy_csv


class Receiver:
    """A webhook receiver on 127.0.0.1: answers `fail_first` 500s to each webhook-id, then 200; keeps every
    request (monotonic time, headers, raw body)."""

    def __init__(self, fail_first: int = 2):
        self.fail_first = fail_first
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                with receiver._lock:
                    msg = self.headers.get("webhook-id")
                    seen = sum(1 for r in receiver.requests if r["headers"].get("webhook-id") == msg)
                    code = 500 if seen < receiver.fail_first else 200
                    receiver.requests.append({"t": time.monotonic(), "wall": time.time(), "headers": dict(self.headers), "body": body,
                                              "path": self.path, "code": code})
                self.send_response(code)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/spafit?token=abc"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def of_type(self, event_type: str) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.requests if json.loads(r["body"])["type"] == event_type]


def _admin(make_key) -> Any:
    return make_key("admin")


def _secret(url: str, key: Any) -> str:
    r = httpx.get(f"{url}/v1/webhooks/secret", headers=key.headers, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["secret"]


def _events(url: str, key: Any, job_id: str) -> list[dict]:
    r = httpx.get(f"{url}/v1/jobs/{job_id}/events", headers=key.headers, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_receiver_gets_a_signed_delivery_after_two_failed_attempts(live_server, worker, make_key):
    from spafit_client import Client, WebhookVerificationError, verify_webhook
    from standardwebhooks import Webhook

    key = _admin(make_key)
    with Receiver(fail_first=2) as receiver, Client(live_server.url, api_key=key.key) as client:
        train = client.datasets.upload(toy_csv(48, 0), name="wh-train")
        validation = client.datasets.upload(toy_csv(16, 100), name="wh-validation")
        job = client.jobs.create(task="webhooks", train_dataset=train, validation_dataset=validation,
                                 method=JOB_METHOD, hyperparameters=JOB_HYPERPARAMETERS,
                                 webhook_url=receiver.url, webhook_on_eval=True)
        assert job.webhook_url == receiver.url and job.webhook_on_eval
        try:
            done = client.jobs.wait(job.id, timeout=180)
            wait_until(lambda: [r for r in receiver.of_type("job.succeeded") if r["code"] == 200], 120,
                       "the job.succeeded delivery to get through")
        except Exception:
            print(worker.tail())
            raise
        secret = _secret(live_server.url, key)

    ended = receiver.of_type("job.succeeded")
    assert [r["code"] for r in ended] == [500, 500, 200]
    assert len({r["headers"]["webhook-id"] for r in ended}) == 1  # one message, three attempts
    assert all(r["path"] == "/hooks/spafit?token=abc" for r in ended)
    last = ended[-1]
    payload = verify_webhook(last["body"], last["headers"], secret)
    assert payload["type"] == "job.succeeded"
    data = payload["data"]
    assert data["job_id"] == job.id and data["task"] == "webhooks" and data["status"] == "succeeded"
    assert data["adapter_version"] == done.adapter_version and data["metrics"] == done.metrics
    assert data["error"] is None
    assert Webhook(secret).verify(last["body"], last["headers"]) == payload  # the reference implementation agrees
    # Each attempt is signed afresh: the earlier ones verify too (their timestamps are recent).
    for r in ended[:2]:
        assert verify_webhook(r["body"], r["headers"], secret)["data"]["job_id"] == job.id

    # What a receiver must refuse: an altered body, a replay outside the tolerance, another tenant's secret.
    tampered = last["body"].replace(b'"succeeded"', b'"failed"', 1)
    assert tampered != last["body"]
    with pytest.raises(WebhookVerificationError, match="no webhook-signature"):
        verify_webhook(tampered, last["headers"], secret)
    with pytest.raises(WebhookVerificationError, match="old"):
        verify_webhook(last["body"], last["headers"], secret, now=time.time() + 301)
    other = make_key("admin")
    with pytest.raises(WebhookVerificationError):
        verify_webhook(last["body"], last["headers"], _secret(live_server.url, other))

    # One eval delivery per epoch, before the end, each also retried twice.
    evals = [r for r in receiver.of_type("job.eval") if r["code"] == 200]
    assert sorted(json.loads(r["body"])["data"]["epoch"] for r in evals) == [1, 2]
    assert all(json.loads(r["body"])["data"]["metrics"] for r in evals)

    # Every attempt is a job event: attempt number, status code, the delay before the next.
    webhook_events = [e["data"] for e in _events(live_server.url, key, job.id) if e["type"] == "webhook"]
    ended_events = [e for e in webhook_events if e["event"] == "job.succeeded"]
    assert [(e["attempt"], e["status_code"], e["outcome"]) for e in ended_events] == [
        (1, 500, "retrying"), (2, 500, "retrying"), (3, 200, "delivered")]
    assert [e["next_retry_in_s"] for e in ended_events] == [0.5, 1.0, None]
    assert ended_events[0]["error"] == "HTTP 500" and ended_events[2]["error"] is None
    # Backoff: the gaps between attempts are at least the delays the events announced.
    gaps = [b["t"] - a["t"] for a, b in zip(ended, ended[1:], strict=False)]
    assert gaps[0] >= 0.45 and gaps[1] >= 0.95, gaps

    deliveries = httpx.get(f"{live_server.url}/v1/webhooks/deliveries", params={"job": job.id},
                           headers=key.headers, timeout=10).json()["items"]
    by_event = {d["event"]: d for d in deliveries if d["event"] == "job.succeeded"}
    assert by_event["job.succeeded"]["status"] == "delivered" and by_event["job.succeeded"]["attempts"] == 3
    assert by_event["job.succeeded"]["webhook_id"] == last["headers"]["webhook-id"]
    assert len([d for d in deliveries if d["event"] == "job.eval"]) == 2
    figures = {
        "status_codes": [r["code"] for r in ended], "announced_delays_s": [e["next_retry_in_s"] for e in ended_events],
        "measured_gaps_s": [round(g, 3) for g in gaps],
        "attempt_seconds": [e["seconds"] for e in ended_events],
        "job_finished_to_first_attempt_s": round(ended[0]["wall"] - done.finished_at.timestamp(), 3),
        "eval_deliveries": len(evals), "loadavg": [round(x, 2) for x in os.getloadavg()]}
    print(json.dumps(figures))
    if os.environ.get("SPAFIT_WEBHOOK_OUT"):  # benchmarks/RELIABILITY.md quotes benchmarks/results/webhooks.json
        Path(os.environ["SPAFIT_WEBHOOK_OUT"]).write_text(json.dumps({
            "command": "SPAFIT_WEBHOOK_OUT=benchmarks/results/webhooks.json python -m pytest "
                       "tests/worker/test_webhooks.py -k receiver_gets", **figures}, indent=2) + "\n")


def test_cancelling_a_queued_job_sends_job_cancelled(job_client, make_key, tiny_base):
    """The API's own path to a final status (cancel) adds the delivery in its transaction and sends it."""
    from spafit_client import verify_webhook

    key = make_key("admin")
    # The job's message is held back, so it is queued for certain when the cancel lands: sent, the session's
    # worker could claim it first, and the job.cancelled delivery would come from the worker's path, not the API's.
    job_client.app.state.send_job = lambda job_id: None
    with Receiver(fail_first=0) as receiver:
        train = job_client.post("/v1/datasets", headers=key.headers,
                                files={"file": ("t.csv", toy_csv(16, 0), "text/csv")}).json()
        created = job_client.post("/v1/jobs", headers=key.headers, json={
            "task": "wh-cancel", "train_dataset": train["id"], "method": JOB_METHOD,
            "hyperparameters": {**JOB_HYPERPARAMETERS, "epochs": 50}, "webhook_url": receiver.url})
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        cancelled = job_client.post(f"/v1/jobs/{job_id}/cancel", headers=key.headers)
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text
        got = wait_until(lambda: receiver.of_type("job.cancelled"), 120, "the job.cancelled delivery")
        secret = job_client.get("/v1/webhooks/secret", headers=key.headers).json()["secret"]
    payload = verify_webhook(got[0]["body"], got[0]["headers"], secret)
    assert payload["data"]["job_id"] == job_id and payload["data"]["status"] == "cancelled"


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9/hook", "http://localhost/hook", "http://10.1.2.3/", "http://192.168.0.10/",
    "http://172.16.5.4/", "http://169.254.169.254/latest/meta-data", "http://[::1]/", "http://[::ffff:127.0.0.1]/",
    "http://0.0.0.0/", "http://100.64.0.1/", "http://[fe80::1]/", "http://[fd00::1]/",
    "ftp://example.com/hook", "file:///etc/passwd", "gopher://1.1.1.1/", "http:///nohost",
    "http://user:pw@93.184.215.14/", "http://name.invalid/hook", "not a url",
    "http://2130706433/", "http://0x7f.1/", "http://[64:ff9b::7f00:1]/", "http://[2002:a00:1::]/",
    "http://exa\x00mple.com/", "http://[::1/", "http://1.1.1.1:99999/",
])
def test_server_mode_refuses_webhook_urls_inside_the_network(client, tenant_key, url):
    key = tenant_key("train")
    train = client.post("/v1/datasets", headers=key.headers,
                        files={"file": ("t.csv", toy_csv(16, 0), "text/csv")}).json()
    r = client.post("/v1/jobs", headers=key.headers, json={"task": "wh", "train_dataset": train["id"],
                                                            "webhook_url": url})
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["type"].endswith("/webhook-url-refused") and body["field"] == "webhook_url"
    assert client.get("/v1/jobs", headers=key.headers).json()["items"] == []  # nothing was stored


def test_webhook_on_eval_needs_a_url_and_long_urls_are_refused(client, tenant_key):
    key = tenant_key("train")
    train = client.post("/v1/datasets", headers=key.headers,
                        files={"file": ("t.csv", toy_csv(16, 0), "text/csv")}).json()
    r = client.post("/v1/jobs", headers=key.headers, json={"task": "wh", "train_dataset": train["id"],
                                                            "webhook_on_eval": True})
    assert r.status_code == 422 and r.json()["field"] == "webhook_on_eval"
    r = client.post("/v1/jobs", headers=key.headers, json={"task": "wh", "train_dataset": train["id"],
                                                            "webhook_url": "https://example.com/" + "a" * 2100})
    assert r.status_code == 422 and "webhook_url" in r.text


def test_url_rules_by_mode_and_setting(make_settings):
    from app.services import webhooks

    server = make_settings()
    embedded = make_settings(mode="embedded", database_url="sqlite://", broker_url="memory://")
    allowing = make_settings(webhook_allow_private_urls=True)
    public = "http://93.184.215.14:8443/hook"  # a literal public address: resolved, never called
    assert webhooks.resolve(public, server) == ("93.184.215.14", 8443, ["93.184.215.14"])
    assert webhooks.resolve("https://93.184.215.14/x", server)[1] == 443
    with pytest.raises(webhooks.UrlRefused):
        webhooks.resolve("http://127.0.0.1:8000/hook", server)
    assert webhooks.resolve("http://127.0.0.1:8000/hook", embedded)[2] == ["127.0.0.1"]  # embedded: loopback ok
    assert webhooks.resolve("http://localhost:8000/hook", embedded)[0] == "localhost"
    with pytest.raises(webhooks.UrlRefused):
        webhooks.resolve("http://10.0.0.1/hook", embedded)  # ... but no other private range
    assert webhooks.resolve("http://10.0.0.1/hook", allowing)[2] == ["10.0.0.1"]
    with pytest.raises(webhooks.UrlRefused):
        webhooks.resolve("http://0.0.0.0/hook", allowing)  # never "any address"
    with pytest.raises(webhooks.UrlRefused):
        webhooks.resolve("ftp://93.184.215.14/", allowing)  # the scheme rule holds regardless

    # A host with one public and one private address (a rebinding setup) is refused as a whole.
    def two_answers(host, port, **kw):
        return [(2, 1, 6, "", ("93.184.215.14", port)), (2, 1, 6, "", ("10.0.0.7", port))]

    with pytest.raises(webhooks.UrlRefused, match="10.0.0.7"):
        webhooks.resolve("http://rebind.example/hook", server, resolver=two_answers)


@contextmanager
def dribbling_receiver(interval: float) -> Iterator[tuple[str, threading.Event]]:
    """(url, cut): a receiver on 127.0.0.1 that answers its first connection with a status line and then one header
    byte every `interval` seconds, never ending; `cut` is set once the sender has closed the connection."""
    listener = socket.create_server(("127.0.0.1", 0))
    cut, stop = threading.Event(), threading.Event()

    def dribble() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            while not stop.is_set():
                try:
                    conn.sendall(b"a")
                except OSError:
                    cut.set()
                    return
                time.sleep(interval)

    threading.Thread(target=dribble, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/h", cut
    finally:
        stop.set()
        listener.close()


def _ended_job_with_delivery(db: Any, tenant_id: uuid.UUID, url: str) -> tuple[uuid.UUID, uuid.UUID]:
    """A failed job with `url` as its webhook, ended the way every path ends a job (its final status event,
    which adds the delivery in the same transaction): (job id, delivery id). This process has no outbox sender,
    so the test sends (or the live API's requeuer would, once overdue)."""
    from app.models import WebhookDelivery

    with db.transaction() as s:
        job_id = _ended_job_in(s, tenant_id, url, status="failed")
    with db.session() as s:
        delivery = s.scalar(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id))
    assert delivery is not None and delivery.event == "job.failed" and delivery.status == "pending"
    return job_id, delivery.id


def _attempts(db: Any, job_id: uuid.UUID) -> list[dict]:
    from app.services import events

    with db.session() as s:
        return [e.data for e in events.after(s, job_id) if e.type == "webhook"]


def _one_shot(make_settings, **kw: Any) -> Any:
    """Settings for a deliver() call in this process: one attempt, and a broker prefix no worker consumes."""
    return make_settings(webhook_max_attempts=1, broker_key_prefix=f"unconsumed-{uuid.uuid4().hex}:", **kw)


def test_the_sender_checks_the_address_again_at_send_time(db, make_settings, tenant_key):
    """A delivery whose URL now points inside (created while allowed, or a name rebound since) is refused when
    sent: nothing reaches the receiver, and the refusal is the attempt's recorded error."""
    from app.models import WebhookDelivery
    from worker.webhooks import deliver

    key = tenant_key("train")
    with Receiver(fail_first=0) as receiver:
        job_id, delivery_id = _ended_job_with_delivery(db, key.tenant_id, receiver.url)
        strict = _one_shot(make_settings)
        assert deliver(db, delivery_id, strict) == "failed"
        assert receiver.requests == []
    with db.session() as s:
        row = s.get(WebhookDelivery, delivery_id)
        assert row.status == "failed" and row.attempts == 1 and row.last_error.startswith("refused:")
    assert [(e["attempt"], e["outcome"], e["status_code"]) for e in _attempts(db, job_id)] == [(1, "failed", None)]
    assert deliver(db, delivery_id, strict) == "final"  # a duplicate message does nothing


def test_redirects_are_not_followed_and_a_dribbling_receiver_is_cut_off(db, make_settings, tenant_key):

    from worker.webhooks import TOTAL_TIMEOUT_GRACE_S, deliver

    key = tenant_key("train")
    allowing = _one_shot(make_settings, webhook_allow_private_urls=True, webhook_timeout_s=0.5)

    class Redirect(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.send_response(307)
            self.send_header("location", "http://169.254.169.254/latest/meta-data")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        job_id, delivery_id = _ended_job_with_delivery(db, key.tenant_id,
                                                       f"http://127.0.0.1:{server.server_address[1]}/h")
        assert deliver(db, delivery_id, allowing) == "failed"
    finally:
        server.shutdown()
        server.server_close()
    assert [(e["status_code"], e["error"]) for e in _attempts(db, job_id)] == [(307, "HTTP 307")]

    # A receiver that sends its status line and then one header byte every 0.2 s: each read is quick, the
    # whole never ends. The attempt gives up after webhook_timeout_s + the grace, not never.
    with dribbling_receiver(0.2) as (url, _):
        job_id, delivery_id = _ended_job_with_delivery(db, key.tenant_id, url)
        started = time.monotonic()
        assert deliver(db, delivery_id, allowing) == "failed"
        took = time.monotonic() - started
    limit = 0.5 + TOTAL_TIMEOUT_GRACE_S
    assert limit <= took < limit + 3, took
    assert _attempts(db, job_id)[0]["error"] == f"no complete answer within {limit:g} s"


def test_a_delivery_whose_message_was_lost_is_resent_and_delivered(db, make_settings, tenant_key, worker):
    """The row, not the broker message, is the truth: a pending delivery overdue by more than a lease (its
    message lost with a broker, or its worker killed mid-attempt) is sent again by the requeuer, and the
    session's real worker delivers it, once."""
    from app.models import WebhookDelivery, utcnow
    from app.services import webhooks
    from tests.live import WORKER_SETTINGS

    key = tenant_key("admin")
    settings = make_settings(**WORKER_SETTINGS)
    with Receiver(fail_first=0) as receiver:
        job_id, delivery_id = _ended_job_with_delivery(db, key.tenant_id, receiver.url)
        with db.transaction() as s:  # as if its message went out an hour ago and was lost
            s.get(WebhookDelivery, delivery_id).next_attempt_at = utcnow() - timedelta(hours=1)
        _, recent_id = _ended_job_with_delivery(db, key.tenant_id, receiver.url)
        with db.transaction() as s:  # overdue too, but its message went out 10 s ago: maybe a busy worker has it
            row = s.get(WebhookDelivery, recent_id)
            row.next_attempt_at, row.enqueued_at = utcnow() - timedelta(hours=1), utcnow() - timedelta(seconds=10)
        resent = webhooks.requeue_due(db, webhooks.broker_sender(settings), settings)
        assert delivery_id in resent and recent_id not in resent
        with db.transaction() as s:  # keep the live API's requeuer away from it for the rest of the session
            s.get(WebhookDelivery, recent_id).status = "failed"
        wait_until(lambda: receiver.requests, 60, "the re-sent delivery")
        time.sleep(1.0)  # a duplicate message (the live API's requeuer may send one too) must not POST again
        assert len(receiver.requests) == 1
    with db.session() as s:
        row = s.get(WebhookDelivery, delivery_id)
        assert row.status == "delivered" and row.attempts == 1 and row.enqueued_at is not None
    assert [e["outcome"] for e in _attempts(db, job_id)] == ["delivered"]


def test_secret_is_admin_only_per_tenant_and_rotates_with_an_overlap(client, tenant_key, make_settings):
    from spafit_client import sign_webhook, verify_webhook

    from app.services import webhooks

    admin = tenant_key("admin")
    trainer = tenant_key("train", tenant=admin.tenant_id)
    assert client.get("/v1/webhooks/secret", headers=trainer.headers).status_code == 403
    assert client.post("/v1/webhooks/secret", headers=trainer.headers).status_code == 403
    assert client.get("/v1/webhooks/secret").status_code == 401
    first = client.get("/v1/webhooks/secret", headers=admin.headers).json()
    assert first["secret"].startswith("whsec_") and first["previous_secret_valid_until"] is None
    assert len(webhooks.secret_key(first["secret"])) == 32
    assert client.get("/v1/webhooks/secret", headers=admin.headers).json() == first  # stable once made
    other = tenant_key("admin")
    assert client.get("/v1/webhooks/secret", headers=other.headers).json()["secret"] != first["secret"]

    rotated = client.post("/v1/webhooks/secret", headers=admin.headers).json()
    assert rotated["secret"] != first["secret"] and rotated["previous_secret_valid_until"] is not None

    # During the overlap a delivery carries both signatures; a receiver on either secret accepts it.
    from app.models import Tenant

    with client.app.state.db.session() as s:
        tenant = s.get(Tenant, admin.tenant_id)
        both = webhooks.signing_secrets(tenant, make_settings())
        none_left = webhooks.signing_secrets(tenant, make_settings(webhook_secret_overlap_s=0))
    assert both == [rotated["secret"], first["secret"]] and none_left == [rotated["secret"]]
    body = webhooks.body_bytes({"type": "job.succeeded", "data": {"x": 1}})
    hdrs = webhooks.headers(both, "msg_1", int(time.time()), body)
    assert len(hdrs["webhook-signature"].split()) == 2
    assert hdrs["webhook-signature"].split()[0] == sign_webhook(rotated["secret"], "msg_1",
                                                                int(hdrs["webhook-timestamp"]), body)
    for secret in (first["secret"], rotated["secret"]):
        assert verify_webhook(body, hdrs, secret)["data"] == {"x": 1}


def test_deliveries_of_another_tenants_job_are_not_listed(client, tenant_key):
    key = tenant_key("train")
    r = client.get("/v1/webhooks/deliveries", params={"job": str(uuid.uuid4())}, headers=key.headers)
    assert r.status_code == 404
    assert client.get("/v1/webhooks/deliveries", headers=key.headers).json() == {"items": [], "next_cursor": None}


def test_embedded_mode_on_sqlite_delivers_to_loopback_and_the_outbox_sends_after_commit(tmp_path):
    """Embedded mode: SQLite registry, loopback allowed. The outbox hands a delivery to the sender only once its
    transaction commits (never for one rolled back), then one attempt delivers it."""
    from app.db import Database
    from app.models import WebhookDelivery
    from app.services import keys, migrate, webhooks
    from app.settings import Settings
    from worker.webhooks import deliver

    url = f"sqlite:///{tmp_path / 'spafit.db'}"
    migrate.upgrade(url)
    settings = Settings(_env_file=None, mode="embedded", data_dir=tmp_path, database_url=url)
    db = Database.from_url(url)
    sent: list[uuid.UUID] = []
    webhooks.install_outbox(db, lambda delivery_id, countdown=None: sent.append(delivery_id))
    try:
        with db.session() as s:
            tenant_id = keys.create_tenant(s, "embedded").id
        with Receiver(fail_first=0) as receiver:
            try:  # a transaction that ends the job, then fails: no row, nothing sent
                with db.transaction() as s:
                    _ended_job_in(s, tenant_id, receiver.url)
                    raise RuntimeError("rolled back")
            except RuntimeError:
                pass
            assert sent == []
            with db.transaction() as s:
                job_id = _ended_job_in(s, tenant_id, receiver.url)
                assert sent == []  # not before the commit
            assert len(sent) == 1
            assert deliver(db, sent[0], settings) == "delivered"
            secret = webhooks.ensure_secret(db.session(), tenant_id).webhook_secret
            from spafit_client import verify_webhook

            assert verify_webhook(receiver.requests[0]["body"], receiver.requests[0]["headers"],
                                  secret)["data"]["job_id"] == str(job_id)
        with db.session() as s:
            assert [d.status for d in s.scalars(select(WebhookDelivery))] == ["delivered"]
    finally:
        db.dispose()


def _ended_job_in(s: Any, tenant_id: uuid.UUID, url: str, status: str = "succeeded") -> uuid.UUID:
    """In transaction `s`: a job ended with `status` the way every path ends one (its final status event)."""
    from app.models import Dataset, Job
    from app.services import events

    ds = Dataset(tenant_id=tenant_id, name="d", format="csv", rows=1, columns=["text", "label"],
                 text_fields=["text"], label_field="label", report={}, source="upload")
    s.add(ds)
    s.flush()
    job = Job(tenant_id=tenant_id, task_name="wh-embedded", base_model="x", train_dataset_id=ds.id,
              text_fields=["text"], label_field="label", method={}, hyperparameters={}, status=status,
              webhook_url=url)
    s.add(job)
    s.flush()
    events.append_in(s, job.id, "status", {"status": status})
    return job.id


def test_https_goes_to_the_checked_address_with_the_name_in_sni_and_the_certificate_checked(db, make_settings,
                                                                                            tenant_key, tmp_path):
    """The sender connects to the address it vetted, but TLS is about the URL's name: the server sees that name
    in SNI, and a certificate no trusted CA signed fails the attempt (never sent on regardless)."""
    import shutil
    import socket
    import ssl
    import subprocess

    from worker.webhooks import deliver

    openssl = shutil.which("openssl")
    assert openssl, "this test needs the openssl command (apt-get install openssl)"
    cert, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key_file), "-out", str(cert)],
                   check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key_file)
    names: list[str | None] = []
    context.sni_callback = lambda sock, name, ctx: names.append(name)
    listener = socket.create_server(("127.0.0.1", 0))
    got_request = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with context.wrap_socket(conn, server_side=True) as tls:
                if tls.recv(1):
                    got_request.set()
        except (ssl.SSLError, OSError):
            pass  # the client refused the certificate

    threading.Thread(target=serve, daemon=True).start()
    try:
        owner = tenant_key("train")
        job_id, delivery_id = _ended_job_with_delivery(db, owner.tenant_id,
                                                       f"https://localhost:{listener.getsockname()[1]}/hook")
        assert deliver(db, delivery_id, _one_shot(make_settings, webhook_allow_private_urls=True)) == "failed"
    finally:
        listener.close()
    assert names == ["localhost"]
    assert not got_request.is_set()  # the signed body never went to an unverified server
    assert "CERTIFICATE_VERIFY_FAILED" in _attempts(db, job_id)[0]["error"]
