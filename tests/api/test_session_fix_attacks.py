"""Attacks on the webhook tenants' turns and the key-name checks, each test failing on the code before its fix:
concurrent attempts of one tenant that all ran at once (the turn was charged only once an attempt ended), a tenant's
clock far in the future (a worker with a skewed clock, or charges under a much smaller share) that held its webhooks
back for as long, and names the admin CLI and the API took with bidirectional controls, Unicode line separators or
bytes that are not UTF-8 (a traceback after the tenant was made: a keyless tenant left behind), and a job's retry with
its Idempotency-Key refused (422) while its webhook host did not resolve, instead of answered with the job."""

from __future__ import annotations

import socket
import threading
import uuid
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update

from tests.api.helpers import assert_problem
from tests.api.test_webhook_key_attacks import _refused, _tenants_named, keys_cli  # noqa: F401 (a fixture)
from tests.tiny import toy_csv
from tests.worker.test_webhooks import _ended_job_with_delivery


def _hanging_url() -> tuple[socket.socket, str]:
    """A listening socket that accepts connections (the kernel's backlog) and never answers."""
    hangs = socket.socket()
    hangs.bind(("127.0.0.1", 0))
    hangs.listen(16)
    return hangs, f"http://127.0.0.1:{hangs.getsockname()[1]}/hook"


# ------------------------------------------------------------------------------------------ tenants' turns
def test_one_tenants_concurrent_attempts_take_turns_too(db, make_settings, tenant_key):
    """With several worker processes (`spafit worker --queues light --concurrency 8`), every due delivery of one
    tenant read its clock before any of them had charged it (the charge came only when an attempt ended): all ran
    at once, each to a receiver that hangs, holding every worker for the whole timeout. An attempt now takes its
    turn when it starts (returned once it ends, for what it did not use): past the burst, the others wait."""
    from app.models import Tenant, WebhookDelivery
    from worker.webhooks import deliver

    settings = make_settings(webhook_allow_private_urls=True, webhook_timeout_s=0.3, webhook_max_attempts=3,
                             webhook_tenant_share=0.1, webhook_tenant_burst_s=1.0,
                             broker_key_prefix=f"unconsumed-{uuid.uuid4().hex}:")
    sent: list[tuple[uuid.UUID, float | None]] = []
    hangs, url = _hanging_url()
    a = tenant_key("train")
    try:
        ids = [_ended_job_with_delivery(db, a.tenant_id, url)[1] for _ in range(3)]
        start = threading.Barrier(len(ids))
        outcomes: dict[uuid.UUID, str] = {}

        def run(delivery_id: uuid.UUID) -> None:
            start.wait()
            outcomes[delivery_id] = deliver(db, delivery_id, settings,
                                            lambda i, countdown=None: sent.append((i, countdown)))

        threads = [threading.Thread(target=run, args=(i,)) for i in ids]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        # one attempt (0.3 s at a 0.1 share: 3 s of A's turn, past its 1 s burst) at a time
        assert sorted(outcomes.values()) == ["deferred", "deferred", "retrying"], outcomes
        with db.session() as s:
            busy = s.get(Tenant, a.tenant_id).webhook_busy_until
        from app.models import utcnow

        # what the attempt used is charged, not what it could have used (the rest was returned when it ended)
        assert 2.0 < (busy - utcnow()).total_seconds() < 10.0, busy
        waits = [c for i, c in sent if outcomes[i] == "deferred"]
        assert len(waits) == 2 and all(0 < w for w in waits), sent
        with db.session() as s:  # the waiting ones used no attempt
            assert sorted(s.get(WebhookDelivery, i).attempts for i in ids) == [0, 0, 1]
    finally:
        hangs.close()


def test_a_tenant_clock_far_in_the_future_holds_its_webhooks_back_for_one_attempt_at_most(db, make_settings,
                                                                                           tenant_key):
    """A tenant's clock was taken as it stood, however far ahead: one worker whose clock ran a month fast, or
    charges made under a much smaller SPAFIT_WEBHOOK_TENANT_SHARE (its lower bound is 0+) since raised again,
    held all that tenant's webhooks back for a month (a countdown of a month on the broker). No attempt moves the
    clock more than one lease at the current share past the burst: it is never taken as further ahead than that."""
    from app.models import Tenant, WebhookDelivery, utcnow
    from app.services import webhooks
    from worker.webhooks import deliver

    settings = make_settings(webhook_allow_private_urls=True, webhook_timeout_s=0.3, webhook_max_attempts=3,
                             webhook_tenant_share=1.0, webhook_tenant_burst_s=0.0,
                             broker_key_prefix=f"unconsumed-{uuid.uuid4().hex}:")
    most = settings.webhook_tenant_burst_s + webhooks.lease_s(settings) / settings.webhook_tenant_share
    sent: list[tuple[uuid.UUID, float | None]] = []
    a = tenant_key("train")
    hangs, url = _hanging_url()
    try:
        _, delivery = _ended_job_with_delivery(db, a.tenant_id, url)
        with db.transaction() as s:
            s.execute(update(Tenant).where(Tenant.id == a.tenant_id)
                      .values(webhook_busy_until=utcnow() + timedelta(days=30)))
        assert deliver(db, delivery, settings, lambda i, countdown=None: sent.append((i, countdown))) == "deferred"
        now = utcnow()
        with db.session() as s:
            row = s.get(WebhookDelivery, delivery)
            busy = s.get(Tenant, a.tenant_id).webhook_busy_until
            assert row.attempts == 0 and row.status == "pending"
            assert (row.next_attempt_at - now).total_seconds() <= most + 1, row.next_attempt_at
        assert (busy - now).total_seconds() <= most + 1, busy  # and it stays so: the next turn comes
        assert len(sent) == 1 and sent[0][1] <= most + 1, sent
    finally:
        hangs.close()


# ------------------------------------------------------------------------------------------ names
@pytest.mark.parametrize("name", ["gpj\u202e.exe", "two\u2028lines", "para\u2029", "iso\u2066late\u2069"])
def test_a_key_name_with_a_bidi_control_or_a_unicode_line_separator_is_422(client, tenant_key, db, name):
    """The key-name check refused C0 and C1 controls (its purpose: no line breaks or terminal escapes in what
    `spafit keys list` prints) but not U+2028 / U+2029, Unicode's own line and paragraph separators, nor the
    bidirectional controls (U+202E shows the rest of the line reversed: a name reads as another)."""
    from app.errors import InvalidInput
    from app.services import keys

    admin = tenant_key("admin")
    r = client.post("/v1/keys", headers=admin.headers, json={"name": name, "scopes": ["predict"]})
    assert_problem(r, 422)
    assert r.json()["field"] == "name"
    names = [k["name"] for k in client.get("/v1/keys", headers=admin.headers).json()["items"]]
    assert names == ["test"]
    with db.session() as s, pytest.raises(InvalidInput):
        keys.create_tenant(s, f"tenant {name}")


def test_cli_names_that_are_not_utf8_are_refused_without_a_traceback_or_a_keyless_tenant(keys_cli, db):  # noqa: F811
    """A command line's bytes that are not UTF-8 (`--tenant $'\\xff'`) reach Python as lone surrogates: they passed
    the name checks and failed in the database's encoder, a traceback (exit 1) — for `--name`, after the tenant
    had been made, so a keyless tenant was left behind; `keys list` with such a tenant was a traceback too."""
    from app.cli.common import EXIT_NOT_FOUND

    _refused(keys_cli("create", "--tenant", "bad\udcff", "--scope", "admin"), "tenant name", "UTF-8")
    tenant = f"ok-{uuid.uuid4().hex[:8]}"
    _refused(keys_cli("create", "--tenant", tenant, "--name", "k\udcff"), "key name", "UTF-8")
    assert _tenants_named(db, tenant) == 0
    r = keys_cli("list", "--tenant", "bad\udcff")
    assert r.exit_code == EXIT_NOT_FOUND and isinstance(r.exception, SystemExit), (r.output, repr(r.exception))


# ------------------------------------------------------------------------------------------ jobs: idempotent retries
def test_a_retry_with_the_same_idempotency_key_is_replayed_while_the_webhook_host_does_not_resolve(client,
                                                                                                  tenant_key,
                                                                                                  monkeypatch):
    """`jobs.create` now looks the webhook host up before anything else, the idempotent replay included: a client
    retrying POST /v1/jobs after a timeout (the job was made) got 422 webhook-url-refused while its receiver's DNS
    was failing or slow (the very thing that can make the first request time out), and took the job for not made.
    A retry with a used key answers with that job, whatever its webhook host resolves to now."""
    from app.services import webhooks

    def public_dns(host: str, port: int, **kw: Any) -> list:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port))]

    def failing_dns(host: str, port: int, **kw: Any) -> list:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    key = tenant_key("train")
    train = client.post("/v1/datasets", headers=key.headers,
                        files={"file": ("t.csv", toy_csv(16, 0), "text/csv")}).json()
    request = {"task": "wh-replay", "train_dataset": train["id"], "webhook_url": "https://hooks.example/in"}
    headers = {**key.headers, "Idempotency-Key": f"replay-{uuid.uuid4().hex}"}
    monkeypatch.setitem(webhooks.resolve.__kwdefaults__, "resolver", public_dns)
    first = client.post("/v1/jobs", headers=headers, json=request)
    assert first.status_code == 202, first.text
    monkeypatch.setitem(webhooks.resolve.__kwdefaults__, "resolver", failing_dns)
    again = client.post("/v1/jobs", headers=headers, json=request)
    assert again.status_code == 202, again.text
    assert again.json()["id"] == first.json()["id"]
    fresh = client.post("/v1/jobs", headers={**key.headers, "Idempotency-Key": f"new-{uuid.uuid4().hex}"},
                        json=request)  # a new request is still refused: its URL is checked
    assert_problem(fresh, 422, "webhook-url-refused")
    # only its acceptance mattered: the session's worker, which other files' jobs wait for, need not train it
    assert client.post(f"/v1/jobs/{first.json()['id']}/cancel", headers=key.headers).status_code == 200


# ------------------------------------------------------------------------------------------ webhook URLs: IDNA
@pytest.mark.parametrize("host", ["faß.example", "ς.example", "a\u200db.example", "💩.example"])
def test_a_host_idna_2003_writes_as_another_domain_is_refused_not_delivered_there(client, tenant_key, db,
                                                                                 make_settings, monkeypatch, host):
    """getaddrinfo writes a non-ASCII name by IDNA 2003, which makes some names another domain than the one
    registries and browsers (IDNA 2008) mean: `faß.example` was looked up, and once Host and SNI were IDNA too
    (5162cda) signed and delivered, as `fass.example`; `ς` as `σ`; a joiner was dropped. Such a host is refused at
    job creation (422 naming webhook_url) and, for a delivery made before, at send time: nothing is looked up or
    sent."""
    from app.models import WebhookDelivery
    from app.services import webhooks
    from tests.worker.test_webhooks import _one_shot
    from worker.webhooks import deliver

    asked: list[str] = []

    def anywhere(name: str, port: int, **kw: Any) -> list:
        asked.append(name)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port))]

    monkeypatch.setitem(webhooks.resolve.__kwdefaults__, "resolver", anywhere)
    key = tenant_key("train")
    train = client.post("/v1/datasets", headers=key.headers,
                        files={"file": ("t.csv", toy_csv(16, 0), "text/csv")}).json()
    r = client.post("/v1/jobs", headers=key.headers, json={"task": "wh-idna", "train_dataset": train["id"],
                                                            "webhook_url": f"https://{host}/hook"})
    body = assert_problem(r, 422, "webhook-url-refused")
    assert body["field"] == "webhook_url" and "xn--" in body["detail"]
    _, delivery = _ended_job_with_delivery(db, key.tenant_id, f"https://{host}/hook")
    assert deliver(db, delivery, _one_shot(make_settings)) == "failed"
    with db.session() as s:
        assert s.get(WebhookDelivery, delivery).last_error.startswith("refused:")
    assert asked == []
    webhooks.check_url("https://bücher.example/hook", make_settings())  # a name both write alike still passes
    assert asked == ["bücher.example"]
