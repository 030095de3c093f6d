"""Attacks on webhooks, API keys and the admin CLI's `keys create`, each test failing on the code before its fix:
names the CLI stored as given (empty, control characters) or sent to the database to fail with its SQL (over 100
characters), a tenant named like a UUID that got no second key, C1 control characters in key names, IPv6 reserved
addresses (::/8) taken for public ones, the inside address a name resolves to told to the tenant, a webhook host
with non-ASCII letters that could never be delivered to, and a dribbling receiver whose connection outlived its
attempt."""

from __future__ import annotations

import functools
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError

from tests.api.helpers import assert_problem
from tests.live import wait_until
from tests.tiny import toy_csv
from tests.worker.test_webhooks import (
    Receiver,
    _attempts,
    _ended_job_with_delivery,
    _one_shot,
    dribbling_receiver,
)


# ------------------------------------------------------------------------------------------ admin CLI: names
@pytest.fixture
def keys_cli(pg_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    """`spafit keys ...` in server mode on the session database (CliRunner, in process)."""
    from click.testing import CliRunner

    from app.cli import main
    from app.settings import get_settings

    for name in [n for n in os.environ if n.startswith("SPAFIT_") and not n.startswith("SPAFIT_TEST_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SPAFIT_MODE", "server")
    monkeypatch.setenv("SPAFIT_DATABASE_URL", pg_url)
    monkeypatch.setenv("SPAFIT_BROKER_URL", redis_url)

    def run(*args: str) -> Any:
        get_settings.cache_clear()
        try:
            return CliRunner().invoke(main, ["keys", *args])
        finally:
            get_settings.cache_clear()

    return run


def _refused(r: Any, *words: str) -> None:
    """The CLI refused the input as invalid: exit 6 and one `error:` line naming `words`, no traceback (the
    services' own errors were tracebacks with exit 1 before `exit_code_for` knew them)."""
    from app.cli.common import EXIT_INVALID

    assert r.exit_code == EXIT_INVALID and isinstance(r.exception, SystemExit), (r.output, repr(r.exception))
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert all(w in r.stderr for w in words), r.stderr


def _tenants_named(db: Any, name: str) -> int:
    from app.models import Tenant

    with db.session() as s:
        return len(list(s.scalars(select(Tenant.id).where(Tenant.name == name))))


@pytest.mark.parametrize("tenant", ["", "   ", "evil\nname", "bell\x07", "csi\x9b31m"])
def test_cli_keys_create_refuses_a_blank_or_control_character_tenant_name(keys_cli, db, tenant):
    """`spafit keys create --tenant ""` made a tenant with an empty name (and printed a key for it); a name with a
    line break or a terminal escape was stored as given and printed back by every `keys` command."""
    r = keys_cli("create", "--tenant", tenant, "--scope", "admin")
    _refused(r, "tenant name")
    assert _tenants_named(db, tenant) == 0


def test_cli_keys_create_with_an_over_long_tenant_or_key_name_is_no_database_error(keys_cli, db):
    """A tenant name over the column's 100 characters reached Postgres: StringDataRightTruncation, printed with
    the INSERT and its parameters, instead of a message naming the limit; the same for `--name`."""
    r = keys_cli("create", "--tenant", "a" * 150, "--scope", "admin")
    assert not isinstance(r.exception, DBAPIError), repr(r.exception)
    _refused(r, "100")
    tenant = f"long-key-{uuid.uuid4().hex[:8]}"
    r = keys_cli("create", "--tenant", tenant, "--name", "n" * 150)
    assert not isinstance(r.exception, DBAPIError), repr(r.exception)
    _refused(r, "key name", "100")
    assert _tenants_named(db, tenant) == 0  # the name is checked before a new tenant is committed (no keyless one)


def test_cli_keys_create_with_a_bad_key_name_leaves_no_keyless_tenant(keys_cli, db):
    """A bad --name for a new tenant failed only after the tenant had been committed: a tenant with no key was left
    behind (and a retry with a good name found it and went on, so only `keys list` showed it)."""
    tenant = f"no-keyless-{uuid.uuid4().hex[:8]}"
    _refused(keys_cli("create", "--tenant", tenant, "--name", "  "), "key name")
    assert _tenants_named(db, tenant) == 0
    listed = keys_cli("list", "--tenant", tenant)
    assert listed.exit_code == 3, listed.output  # not found


def test_cli_a_tenant_named_like_a_uuid_gets_a_second_key(keys_cli, db):
    """`get_tenant` looked a UUID-shaped argument up by id only: the first `keys create --tenant <uuid>` made a
    tenant of that name, the second found no tenant with that id, tried to create it again and died on the
    unique name (Conflict, a traceback); `keys list` said the tenant did not exist."""
    name = str(uuid.uuid4())
    first = keys_cli("create", "--tenant", name, "--scope", "train", "--json")
    assert first.exit_code == 0, (first.output, first.exception)
    second = keys_cli("create", "--tenant", name, "--scope", "predict", "--json")
    assert second.exit_code == 0, (second.output, repr(second.exception))
    assert json.loads(second.stdout)["tenant_id"] == json.loads(first.stdout)["tenant_id"]
    listed = keys_cli("list", "--tenant", name, "--json")
    assert listed.exit_code == 0 and len(json.loads(listed.stdout)) == 2, listed.output
    assert _tenants_named(db, name) == 1


def test_the_key_service_checks_names_whoever_calls_it(db):
    from app.errors import InvalidInput
    from app.services import keys

    with db.session() as s:
        for bad in ("", " \t", "x" * 101, "nul\x00"):
            with pytest.raises(InvalidInput):
                keys.create_tenant(s, bad)
        tenant = keys.create_tenant(s, f"names-{uuid.uuid4().hex[:8]}")
        for bad in ("", "  ", "k" * 101, "esc\x1b[2J", "csi\x9b2J"):
            with pytest.raises(InvalidInput):
                keys.create_key(s, tenant.id, bad, ["train"])
        assert keys.list_keys(s, tenant.id) == []
        row, _ = keys.create_key(s, tenant.id, "ünïcode ok – 100%", ["train"])
        assert row.name == "ünïcode ok – 100%"


# ------------------------------------------------------------------------------------------ API: key names
@pytest.mark.parametrize("name", ["csi\x9b2J", "nel\x85", "   "])
def test_an_api_key_name_with_a_c1_control_or_only_blanks_is_422(client, tenant_key, name):
    """The API refused C0 controls in a key's name but not C1 ones (U+0080-U+009F: U+009B is CSI, a terminal
    escape when `spafit keys list` prints the name to an operator) nor a name of blanks."""
    admin = tenant_key("admin")
    r = client.post("/v1/keys", headers=admin.headers, json={"name": name, "scopes": ["predict"]})
    assert_problem(r, 422)
    names = [k["name"] for k in client.get("/v1/keys", headers=admin.headers).json()["items"]]
    assert names == ["test"]  # only the fixture's own key


# ------------------------------------------------------------------------------------------ webhook URLs
@pytest.mark.parametrize("url", ["http://[::7f00:1]/", "http://[::127.0.0.1]:8000/", "http://[::ffff:0:7f00:1]/",
                                 "http://[::a9fe:a9fe]/latest/meta-data", "http://[4000::1]/"])
def test_reserved_ipv6_addresses_are_refused(client, tenant_key, make_settings, url):
    """Python's `is_global` is true for IPv6's reserved ::/8 (IPv4-compatible ::127.0.0.1, SIIT ::ffff:0:a.b.c.d)
    and the other IETF-reserved blocks; the README promises reserved addresses are refused. On a host whose
    kernel routes IPv4-compatible addresses (a sit tunnel, a SIIT translator) ::7f00:1 is loopback."""
    from app.services import webhooks

    with pytest.raises(webhooks.UrlRefused):
        webhooks.resolve(url, make_settings())
    key = tenant_key("train")
    train = client.post("/v1/datasets", headers=key.headers,
                        files={"file": ("t.csv", toy_csv(16, 0), "text/csv")}).json()
    r = client.post("/v1/jobs", headers=key.headers, json={"task": "wh", "train_dataset": train["id"],
                                                            "webhook_url": url})
    body = assert_problem(r, 422, "webhook-url-refused")
    assert body["field"] == "webhook_url"


def test_a_refused_name_does_not_tell_the_tenant_the_inside_address_it_resolves_to(client, tenant_key, db,
                                                                                   make_settings):
    """The 422 said `'localhost' is (or resolves to) 127.0.0.1`: any tenant could map the service's own network
    by name (`http://postgres/`, `http://redis/` in compose answer with the containers' addresses). The same
    words went into a delivery's `last_error`, which the tenant reads at /v1/webhooks/deliveries."""
    from app.models import WebhookDelivery
    from worker.webhooks import deliver

    key = tenant_key("train")
    train = client.post("/v1/datasets", headers=key.headers,
                        files={"file": ("t.csv", toy_csv(16, 0), "text/csv")}).json()
    r = client.post("/v1/jobs", headers=key.headers, json={"task": "wh", "train_dataset": train["id"],
                                                            "webhook_url": "http://localhost:5432/"})
    body = assert_problem(r, 422, "webhook-url-refused")
    assert "localhost" in body["detail"] and "private" in body["detail"]
    assert "127.0.0.1" not in body["detail"] and "::1" not in body["detail"], body["detail"]

    job_id, delivery_id = _ended_job_with_delivery(db, key.tenant_id, "http://localhost:9/hook")
    assert deliver(db, delivery_id, _one_shot(make_settings)) == "failed"
    with db.session() as s:
        error = s.get(WebhookDelivery, delivery_id).last_error
    assert error.startswith("refused:") and "127.0.0.1" not in error and "::1" not in error, error
    listed = client.get("/v1/webhooks/deliveries", params={"job": str(job_id)}, headers=key.headers).json()
    assert "127.0.0.1" not in json.dumps(listed)
    # a literal address is the tenant's own words: it may be repeated
    r = client.post("/v1/jobs", headers=key.headers, json={"task": "wh", "train_dataset": train["id"],
                                                            "webhook_url": "http://10.1.2.3/"})
    assert "10.1.2.3" in assert_problem(r, 422, "webhook-url-refused")["detail"]


# ------------------------------------------------------------------------------------------ delivery
def test_a_host_with_non_ascii_letters_is_delivered_with_its_idna_name(db, make_settings, tenant_key, monkeypatch):
    """`https://bücher.example/hook` passes the URL check (getaddrinfo resolves the name in its IDNA form), but the
    sender put the URL's netloc in the Host header as is, and httpx encodes header values as ASCII: every attempt
    failed with UnicodeEncodeError until the delivery was given up."""
    from app.services import webhooks
    from worker.webhooks import deliver

    def to_loopback(host: str, port: int, **kw: Any) -> list:
        assert host == "bücher.example", host
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    monkeypatch.setattr(webhooks, "resolve", functools.partial(webhooks.resolve, resolver=to_loopback))
    key = tenant_key("train")
    with Receiver(fail_first=0) as receiver:
        port = receiver.server.server_address[1]
        job_id, delivery_id = _ended_job_with_delivery(db, key.tenant_id, f"http://Bücher.example:{port}/hook?x=1")
        outcome = deliver(db, delivery_id, _one_shot(make_settings, webhook_allow_private_urls=True))
        assert outcome == "delivered", _attempts(db, job_id)
        assert len(receiver.requests) == 1
        got = receiver.requests[0]
    assert {k.lower(): v for k, v in got["headers"].items()}["host"] == f"xn--bcher-kva.example:{port}"
    assert got["path"] == "/hook?x=1"


def test_a_dribbling_receiver_is_disconnected_when_its_attempt_gives_up(db, make_settings, tenant_key):
    """The attempt stopped waiting after webhook_timeout_s + grace, but its thread and connection lived on while
    the receiver sent a byte every few seconds (httpx's timeout is per read): hours per attempt, one more thread
    and socket in the worker for each attempt of each such delivery."""
    from worker.webhooks import TOTAL_TIMEOUT_GRACE_S, deliver

    key = tenant_key("train")
    with dribbling_receiver(0.1) as (url, cut):
        job_id, delivery_id = _ended_job_with_delivery(db, key.tenant_id, url)
        settings = _one_shot(make_settings, webhook_allow_private_urls=True, webhook_timeout_s=0.5)
        assert deliver(db, delivery_id, settings) == "failed"
        assert _attempts(db, job_id)[0]["error"] == f"no complete answer within {0.5 + TOTAL_TIMEOUT_GRACE_S:g} s"
        assert cut.wait(3), "the receiver's connection is still open after the attempt gave up"
        deadline = time.monotonic() + 3
        while any(t.name == "webhook-post" for t in threading.enumerate()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(t.name == "webhook-post" for t in threading.enumerate())


def test_a_webhook_host_that_never_resolves_is_refused_in_bounded_time(client, tenant_key, monkeypatch):
    """POST /v1/jobs resolved the webhook URL's name with no bound of its own, after it had read the datasets: a
    tenant naming hosts whose DNS server never answers held a request thread and one of the pool's few database
    connections (5 + 10 by default) per request for as long as the system resolver kept trying, so a handful of
    such requests kept other tenants waiting for a connection."""
    from app.services import webhooks

    answer = threading.Event()

    def silent_dns(host: str, port: int, **kw: Any) -> list:
        answer.wait(30)  # a DNS server that never answers (the system resolver gives up after its own timeouts)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setitem(webhooks.resolve.__kwdefaults__, "resolver", silent_dns)
    key = tenant_key("train")
    train = client.post("/v1/datasets", headers=key.headers,
                        files={"file": ("t.csv", toy_csv(16, 0), "text/csv")}).json()
    try:
        started = time.monotonic()
        r = client.post("/v1/jobs", headers=key.headers, json={"task": "wh", "train_dataset": train["id"],
                                                                "webhook_url": "https://never.example/hook"})
        took = time.monotonic() - started
    finally:
        answer.set()
    body = assert_problem(r, 422, "webhook-url-refused")
    assert body["field"] == "webhook_url" and "never.example" in body["detail"]
    assert took < 10, took  # RESOLVE_TIMEOUT_S (5 s), with room for a loaded machine


def test_a_tenant_naming_hosts_that_never_resolve_holds_a_few_lookups_and_another_tenant_is_not_held(
        client, tenant_key, monkeypatch):
    """Each job creation whose webhook host's DNS server never answers held a route thread for RESOLVE_TIMEOUT_S and
    left a lookup thread behind until the system resolver gave up, with no bound per tenant: a tenant sending such
    requests, a new name each, could take the thread pool every tenant's routes run on (40 threads). Now a tenant has
    at most LOOKUPS_PER_TENANT lookups in flight, held until their threads end; one more is a 429 at once, while
    another tenant's lookup still runs."""
    from concurrent.futures import ThreadPoolExecutor

    from app.services import webhooks

    answer = threading.Event()

    def silent_dns(host: str, port: int, **kw: Any) -> list:
        answer.wait(30)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setitem(webhooks.resolve.__kwdefaults__, "resolver", silent_dns)
    a, b = tenant_key("train"), tenant_key("train")
    datasets = {k.tenant_id: client.post("/v1/datasets", headers=k.headers,
                                         files={"file": ("t.csv", toy_csv(16, 0), "text/csv")}).json()["id"]
                for k in (a, b)}

    def create(key: Any, host: str) -> Any:
        return client.post("/v1/jobs", headers=key.headers, json={
            "task": "wh-slow", "train_dataset": datasets[key.tenant_id], "webhook_url": f"https://{host}/hook"})

    limit = webhooks.LOOKUPS_PER_TENANT
    with ThreadPoolExecutor(limit + 1) as pool:
        try:
            held = [pool.submit(create, a, f"a{i}.slow.example") for i in range(limit)]
            wait_until(lambda: webhooks._turns.get(a.tenant_id) == limit, 10, "tenant a's lookups to start")
            started = time.monotonic()
            one_more = create(a, "a-more.slow.example")
            assert time.monotonic() - started < 2
            body = assert_problem(one_more, 429, "too-many-lookups")
            assert one_more.headers["retry-after"] and "lookups in flight" in body["detail"]
            other = pool.submit(create, b, "b.slow.example")
            wait_until(lambda: webhooks._turns.get(b.tenant_id) == 1, 10, "tenant b's lookup to start")
        finally:
            answer.set()
        for r in [*(f.result(30) for f in held), other.result(30)]:
            assert_problem(r, 422, "webhook-url-refused")
    wait_until(lambda: a.tenant_id not in webhooks._turns and b.tenant_id not in webhooks._turns, 10,
             "the lookups' turns to be given back")
    assert_problem(create(a, "a-again.slow.example"), 422, "webhook-url-refused")


def test_the_webhook_name_is_looked_up_before_the_job_holds_a_database_connection(client, tenant_key, db,
                                                                                  make_settings, monkeypatch):
    """`jobs.create` looked the webhook's host up after its idempotency and dataset queries: the request's session
    held a pooled connection all through the lookup (up to RESOLVE_TIMEOUT_S), one of the pool's few per tenant
    naming slow hosts. Now it looks up first, with no transaction (and so no connection) open."""
    from app.schemas_jobs import JobCreate
    from app.services import jobs, webhooks

    key = tenant_key("train")
    train = client.post("/v1/datasets", headers=key.headers,
                        files={"file": ("t.csv", toy_csv(16, 0), "text/csv")}).json()
    held: list[bool] = []
    with db.session() as s:
        def public_dns(host: str, port: int, **kw: Any) -> list:
            held.append(s.in_transaction())
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port))]

        monkeypatch.setitem(webhooks.resolve.__kwdefaults__, "resolver", public_dns)
        body = JobCreate(task="wh-order", train_dataset=train["id"], webhook_url="https://hooks.example/in")
        job, created = jobs.create(s, key.tenant_id, body, make_settings(), idempotency_key="order-1")
        assert created and job.webhook_url == "https://hooks.example/in"
        s.commit()
    assert held == [False]
    # the job was only needed stored: cancelled, so that no requeuer sends it to the session's worker
    assert client.post(f"/v1/jobs/{job.id}/cancel", headers=key.headers).status_code == 200


# ------------------------------------------------------------------------------------------ tenants' turns
def test_a_tenant_whose_receivers_hang_waits_for_its_turn_and_the_others_go_first(db, make_settings, tenant_key):
    """One worker runs every tenant's webhook attempts (and training). An attempt to a receiver that never answers
    held it for the whole timeout, up to ten attempts a delivery, and a tenant could make deliveries in a loop
    (create and cancel jobs): its attempts took the worker from every other tenant. Now each tenant's attempts get
    a share of the workers' time (SPAFIT_WEBHOOK_TENANT_SHARE): past it, its next attempt waits its turn, using no
    attempt, and another tenant's delivery runs at once."""
    from app.models import Tenant, WebhookDelivery
    from worker.webhooks import deliver

    settings = make_settings(webhook_allow_private_urls=True, webhook_timeout_s=0.3, webhook_max_attempts=3,
                             webhook_tenant_share=0.1, webhook_tenant_burst_s=1.0,
                             broker_key_prefix=f"unconsumed-{uuid.uuid4().hex}:")
    sent: list[tuple[uuid.UUID, float | None]] = []

    def send_(delivery_id: uuid.UUID, countdown: float | None = None) -> None:
        sent.append((delivery_id, countdown))

    hangs = socket.socket()  # accepts connections (the kernel's backlog) and never answers
    hangs.bind(("127.0.0.1", 0))
    hangs.listen(16)
    hang_url = f"http://127.0.0.1:{hangs.getsockname()[1]}/hook"
    a, b = tenant_key("train"), tenant_key("train")
    try:
        _, first = _ended_job_with_delivery(db, a.tenant_id, hang_url)
        _, second = _ended_job_with_delivery(db, a.tenant_id, hang_url)
        assert deliver(db, first, settings, send_) == "retrying"  # ~0.3 s: 3 s of A's turn at a 0.1 share
        with db.session() as s:
            busy = s.get(Tenant, a.tenant_id).webhook_busy_until
            assert s.get(Tenant, b.tenant_id).webhook_busy_until is None
        assert busy is not None

        sent.clear()
        assert deliver(db, second, settings, send_) == "deferred"
        with db.session() as s:
            row = s.get(WebhookDelivery, second)
            assert row.status == "pending" and row.attempts == 0, (row.status, row.attempts)
            assert "turn" in row.last_error and "no attempt is used" in row.last_error
            wait = (row.next_attempt_at - busy).total_seconds()
        assert abs(wait + settings.webhook_tenant_burst_s) < 0.5, wait  # due when A is back within its burst
        # ~0.3 s (the timeout) and whatever else the attempt took, over a 0.1 share, less the 1 s burst: a loaded
        # machine's attempt takes longer (a clean-clone CI run measured 3.01 s of wait)
        assert len(sent) == 1 and sent[0][0] == second and 0.5 < sent[0][1] < 15.0, sent

        with Receiver(fail_first=0) as receiver:  # meanwhile B's delivery runs at once
            _, b_delivery = _ended_job_with_delivery(db, b.tenant_id, receiver.url)
            assert deliver(db, b_delivery, settings, send_) == "delivered"
            assert len(receiver.requests) == 1

        time.sleep(sent[0][1] + 0.1)  # A's turn: the waiting delivery is attempted, its first attempt
        assert deliver(db, second, settings, send_) == "retrying"
        with db.session() as s:
            assert s.get(WebhookDelivery, second).attempts == 1
    finally:
        hangs.close()


def test_the_tenant_share_settings_are_checked(make_settings):
    from pydantic import ValidationError

    for bad in ({"webhook_tenant_share": 0}, {"webhook_tenant_share": 1.5}, {"webhook_tenant_burst_s": -1}):
        with pytest.raises(ValidationError):
            make_settings(**bad)
