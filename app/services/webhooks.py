"""Signed webhooks: a job that names a `webhook_url` reports its end (and, if asked, each evaluation) there.

- `check_url` vets a URL: http(s) only, and in server mode no loopback, link-local, private or otherwise
  non-global address (the host is resolved: a name pointing inside is refused too), unless
  SPAFIT_WEBHOOK_ALLOW_PRIVATE_URLS; embedded mode allows loopback. The sender checks again at each attempt
  and connects to the address it checked (DNS rebinding cannot slip another one in between).
- Deliveries are rows, made by a transactional outbox: `events.append_in` calls `on_event`, so the final
  `status` event of a job with a webhook_url (every path that ends a job writes one: the worker, a cancel,
  sweep settling, a give-up) adds its delivery in the same transaction, and an `eval` event a `job.eval` one
  when the job asked. Once that transaction commits, the session hands them to the broker
  (`install_outbox`); a message lost by a broker or a worker is re-sent by `requeue_due`.
- Signing is the Standard Webhooks scheme: `webhook-id`, `webhook-timestamp` and `webhook-signature`
  = `v1,<base64 HMAC-SHA256(secret, "{id}.{timestamp}.{body}")>`, one per valid secret, space-separated.
- Secrets are per tenant (`whsec_` + base64 of 32 random bytes), made on first use and rotated by an admin.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import threading
import uuid
import weakref
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import Engine, select, update
from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session

from ..db import Database
from ..errors import WebhookUrlRefused
from ..models import AdapterVersion, Job, Tenant, WebhookDelivery, utcnow
from ..queues import DELIVER_WEBHOOK, LIGHT_QUEUE, make_celery
from ..settings import Settings

log = logging.getLogger("spafit.webhooks")

TASK_NAME = DELIVER_WEBHOOK
SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
FINAL_EVENTS = {"succeeded": "job.succeeded", "failed": "job.failed", "cancelled": "job.cancelled"}
REQUEUE_BATCH = 500
REQUEUE_SPACING_S = 300.0  # a delivery's message is re-sent at most this often
RESOLVE_TIMEOUT_S = 5.0  # a webhook host's DNS lookup, at job creation and at each send

Sender = Callable[..., None]  # send(delivery_id, countdown=None)


# --------------------------------------------------------------------------------------------- URLs
class UrlRefused(ValueError):
    """The URL may not be called; the message says why, in words. `public` is what the tenant is told: for a
    name, it does not say which inside address the name resolved to (the service's own network is no business of
    a tenant's: `http://postgres/` must not answer with the database's address)."""

    def __init__(self, message: str, *, public: str | None = None):
        super().__init__(message)
        self.public = public or message


Address = ipaddress.IPv4Address | ipaddress.IPv6Address


NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _address_allowed(ip: Address, settings: Settings) -> bool:
    if isinstance(ip, ipaddress.IPv6Address):  # an IPv6 form of an IPv4 address is judged as that address
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
        elif ip.sixtofour is not None:
            ip = ip.sixtofour  # 2002:7f00:1:: is 127.0.0.1 behind a 6to4 relay
        elif ip in NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)  # 64:ff9b::7f00:1 is 127.0.0.1 behind a NAT64
    if settings.webhook_allow_private_urls:
        return not (ip.is_unspecified or ip.is_multicast)
    if ip.is_loopback and settings.mode == "embedded":
        return True
    return ip.is_global and not ip.is_multicast and not ip.is_reserved  # IPv6's reserved ::/8 (::7f00:1) is "global"


# A tenant's webhook host lookups in flight in one API process. Each holds a route thread for up to RESOLVE_TIMEOUT_S
# and a thread of its own until the system resolver gives up: names under a DNS server that never answers, a new one
# per request, let one tenant take the thread pool every tenant's routes run on (40 threads). A lookup that answers
# takes milliseconds, so concurrent job creations of one tenant rarely hold more than one.
LOOKUPS_PER_TENANT = 4
_turns_lock = threading.Lock()
_turns: dict[Any, int] = {}


def _take_turn(tenant_id: Any) -> None:
    with _turns_lock:
        n = _turns.get(tenant_id, 0)
        if n >= LOOKUPS_PER_TENANT:
            from ..errors import TooManyLookups

            raise TooManyLookups(f"this tenant already has {n} webhook host lookups in flight (their hosts answer "
                                 "slowly); retry when they have finished", headers={"Retry-After": "5"})
        _turns[tenant_id] = n + 1


def _give_turn(tenant_id: Any) -> None:
    with _turns_lock:
        n = _turns.get(tenant_id, 1) - 1
        if n > 0:
            _turns[tenant_id] = n
        else:
            _turns.pop(tenant_id, None)


def _lookup(resolver: Callable[..., list], host: str, port: int, tenant_id: Any = None) -> list:
    """`resolver(host, port)`, waiting at most RESOLVE_TIMEOUT_S (TimeoutError after). A tenant's name served by a
    DNS server that never answers held the request (its thread and its pooled database connection: POST /v1/jobs
    has read the datasets by then) for as long as the system resolver kept trying; the lookup itself cannot be
    cancelled, so it finishes in a thread of its own. With `tenant_id`, the lookup is one of the tenant's turns
    (`TooManyLookups` past LOOKUPS_PER_TENANT), held until its thread ends, not just until the caller stops waiting."""
    box: list[tuple[bool, Any]] = []
    if tenant_id is not None:
        _take_turn(tenant_id)

    def run() -> None:
        try:
            box.append((True, resolver(host, port, type=socket.SOCK_STREAM)))
        except BaseException as e:  # handed to the caller
            box.append((False, e))
        finally:
            if tenant_id is not None:
                _give_turn(tenant_id)

    thread = threading.Thread(target=run, name="webhook-resolve", daemon=True)
    thread.start()
    thread.join(RESOLVE_TIMEOUT_S)
    if not box:
        raise TimeoutError(f"no answer within {RESOLVE_TIMEOUT_S:g} s")
    ok, value = box[0]
    if not ok:
        raise value
    return value


def _check_idna(host: str) -> None:
    """Refuse an internationalised name that IDNA 2003 and IDNA 2008 (UTS 46, non-transitional) write differently.
    getaddrinfo, and so the lookup, the Host header and SNI, write it by IDNA 2003, which makes some names another
    domain than the one registries and browsers mean: `faß.de` became `fass.de`, `ς` became `σ`, joiners were
    dropped (`a\\u200db.example` became `ab.example`), and the signed webhook went to that other domain's owner."""
    import idna  # httpx's own dependency

    try:
        same = idna.encode(host, uts46=True, transitional=False) == host.encode("idna")
    except UnicodeError:  # idna.IDNAError too: not a name IDNA 2008 allows (e.g. a joiner out of context, an emoji)
        same = False
    if not same:
        raise UrlRefused(f"the host {host!r} is not an internationalised domain name that IDNA 2003 and IDNA 2008 "
                         "write alike; give it in its ASCII (xn--) form")


def resolve(url: str, settings: Settings, *, resolver: Callable[..., list] = socket.getaddrinfo,
            tenant_id: Any = None) -> tuple[str, int, list[str]]:
    """(host, port, addresses) of an allowed URL; `UrlRefused` otherwise. Every address the host resolves to
    must be allowed: a name with one public and one private address is refused. With `tenant_id`, a name lookup is
    one of the tenant's turns (`_lookup`)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise UrlRefused(f"not a valid URL ({e})") from None
    if parts.scheme not in ("http", "https"):
        raise UrlRefused("only http and https URLs can receive webhooks")
    host = parts.hostname
    if not host:
        raise UrlRefused("the URL names no host")
    if parts.username is not None or parts.password is not None:
        raise UrlRefused("credentials in the URL are not accepted; put a token in the path or query instead")
    port = port if port is not None else (443 if parts.scheme == "https" else 80)
    try:
        literal: Address | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [str(literal)]
    else:
        if not host.isascii():
            _check_idna(host)
        try:
            infos = _lookup(resolver, host, port, tenant_id)
        except TimeoutError:
            raise UrlRefused(f"the host {host!r} did not resolve within {RESOLVE_TIMEOUT_S:g} s") from None
        except (OSError, UnicodeError, ValueError) as e:  # ValueError: a NUL in the name
            raise UrlRefused(f"the host {host!r} does not resolve ({e.__class__.__name__})") from None
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        if not addresses:
            raise UrlRefused(f"the host {host!r} does not resolve")
    for address in addresses:
        if not _address_allowed(ipaddress.ip_address(address.split("%")[0]), settings):
            rule = "webhooks go to public addresses only (SPAFIT_WEBHOOK_ALLOW_PRIVATE_URLS allows them)"
            raise UrlRefused(
                f"{host!r} is (or resolves to) {address}, a loopback, link-local, private or reserved address; {rule}",
                public=None if literal is not None else
                f"{host!r} resolves to a loopback, link-local, private or reserved address; {rule}")
    return host, port, addresses


def check_url(url: str, settings: Settings, *, field: str = "webhook_url", tenant_id: Any = None) -> str:
    """The URL if a webhook may be sent there (see `resolve`); else a 422 naming `field`. With `tenant_id` (the API),
    a name lookup is one of the tenant's turns (429 `too-many-lookups` past LOOKUPS_PER_TENANT)."""
    try:
        resolve(url, settings, tenant_id=tenant_id)
    except UrlRefused as e:
        raise WebhookUrlRefused(f"{field}: {e.public}", field=field) from None
    return url


# --------------------------------------------------------------------------------------------- secrets
def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def secret_key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def ensure_secret(session: Session, tenant_id: uuid.UUID) -> Tenant:
    """The tenant, with a secret made if it had none (two racing callers agree: only a NULL is replaced)."""
    tenant = session.get(Tenant, tenant_id)
    if tenant is not None and tenant.webhook_secret is None:
        session.execute(update(Tenant).where(Tenant.id == tenant_id, Tenant.webhook_secret.is_(None))
                        .values(webhook_secret=new_secret()))
        session.flush()
        session.refresh(tenant)
    return tenant


def rotate_secret(session: Session, tenant_id: uuid.UUID) -> Tenant:
    """A new secret; the old one keeps signing (alongside) for `webhook_secret_overlap_s`."""
    ensure_secret(session, tenant_id)
    # the row held to the commit and read fresh: two rotations at once take turns (each one's new secret is the
    # other's previous), instead of the last writer dropping the first one's secret unseen
    tenant = session.get(Tenant, tenant_id, with_for_update=True, populate_existing=True)
    tenant.webhook_secret_previous, tenant.webhook_secret = tenant.webhook_secret, new_secret()
    tenant.webhook_secret_rotated_at = utcnow()
    session.flush()
    return tenant


def previous_valid_until(tenant: Tenant, settings: Settings) -> datetime | None:
    if tenant.webhook_secret_previous is None or tenant.webhook_secret_rotated_at is None:
        return None
    until = tenant.webhook_secret_rotated_at + timedelta(seconds=settings.webhook_secret_overlap_s)
    return until if until > utcnow() else None


def signing_secrets(tenant: Tenant, settings: Settings) -> list[str]:
    """The secrets a delivery is signed with now: the current one, and the previous one within its overlap."""
    out = [tenant.webhook_secret] if tenant.webhook_secret else []
    if previous_valid_until(tenant, settings) is not None:
        out.append(tenant.webhook_secret_previous)
    return out


# --------------------------------------------------------------------------------------------- signing
def message_id(delivery_id: uuid.UUID) -> str:
    return f"msg_{delivery_id.hex}"


def body_bytes(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def headers(secrets_: list[str], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": " ".join(sign(s, msg_id, timestamp, body) for s in secrets_),
            "content-type": "application/json", "user-agent": "spafit-webhooks/1"}


# --------------------------------------------------------------------------------------------- deliveries
def _finite(value: Any) -> Any:
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def job_state(session: Session, job: Job) -> dict[str, Any]:
    version = session.scalar(select(AdapterVersion.version).where(AdapterVersion.id == job.adapter_version_id)) \
        if job.adapter_version_id else None
    return _finite({
        "job_id": str(job.id), "kind": job.kind, "task": job.task_name, "status": job.status,
        "metrics": job.metrics, "adapter_version": version, "attempts": job.attempts,
        "error": {"type": job.error_type, "message": job.error_message or ""} if job.error_type else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
    })


OUTBOX = "spafit_webhook_outbox"  # session.info key: deliveries this transaction added, sent once it commits


def _add(session: Session, job: Job, event: str, dedupe_key: str, data: dict[str, Any]) -> uuid.UUID | None:
    if session.scalar(select(WebhookDelivery.id).where(WebhookDelivery.dedupe_key == dedupe_key)) is not None:
        return None  # already recorded (a retried transaction, a redelivered message)
    ensure_secret(session, job.tenant_id)
    now = utcnow()
    row = WebhookDelivery(tenant_id=job.tenant_id, job_id=job.id, event=event, dedupe_key=dedupe_key,
                          url=job.webhook_url, status="pending", attempts=0, next_attempt_at=now,
                          payload={"type": event, "timestamp": now.isoformat(), "data": data})
    session.add(row)
    session.flush()
    session.info.setdefault(OUTBOX, []).append(row.id)
    return row.id


def on_event(session: Session, job_id: uuid.UUID, type_: str, data: dict[str, Any]) -> uuid.UUID | None:
    """Called by `events.append_in` for every event, inside its transaction: a final `status` event adds the
    job's `job.<status>` delivery, an `eval` event a `job.eval` one (if the job asked for them). Every path that
    ends a job (worker, cancel, sweep settling, give-up) writes that event with the status, so the delivery
    commits with the status or not at all."""
    if type_ == "status" and data.get("status") in FINAL_EVENTS:
        return job_ended_in(session, job_id)
    if type_ == "eval":
        return job_eval_in(session, job_id, data)
    return None


def job_ended_in(session: Session, job_id: uuid.UUID) -> uuid.UUID | None:
    """Inside the transaction that made job `job_id` final: its `job.<status>` delivery, if it has a
    webhook_url (else None). Idempotent: a job ends once, so a second call adds nothing."""
    session.flush()
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or not job.webhook_url or job.status not in FINAL_EVENTS:
        return None
    return _add(session, job, FINAL_EVENTS[job.status], f"{job.id}:end", job_state(session, job))


def job_eval_in(session: Session, job_id: uuid.UUID, evaluation: dict[str, Any]) -> uuid.UUID | None:
    """Inside the transaction that records an evaluation: its `job.eval` delivery, if the job asked for one.
    One per step: a resumed run that evaluates the same step again does not report it twice."""
    job = session.get(Job, job_id)
    if job is None or not job.webhook_url or not job.webhook_on_eval:
        return None
    step = evaluation.get("step")
    data = {"job_id": str(job.id), "kind": job.kind, "task": job.task_name, "status": "running", "step": step,
            "epoch": evaluation.get("epoch"), "metrics": _finite(evaluation.get("metrics"))}
    return _add(session, job, "job.eval", f"{job.id}:eval:{step}", data)


def send(send_: Sender, db: Database, delivery_id: uuid.UUID | None, *, countdown: float | None = None) -> bool:
    """Hand a committed delivery to the broker; never raises (a delivery whose message did not go out is
    re-sent by `requeue_due`)."""
    if delivery_id is None:
        return False
    try:
        send_(delivery_id, countdown=countdown)
    except Exception as e:
        log.warning("could not send webhook delivery %s to the broker (%s); it will be re-sent", delivery_id, e)
        return False
    try:
        with db.transaction() as s:
            s.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id).values(enqueued_at=utcnow()))
    except Exception:  # only bookkeeping
        log.warning("could not note webhook delivery %s as sent", delivery_id, exc_info=True)
    return True


# The transactional outbox: a session that added deliveries sends them once its transaction commits. The
# sender is per engine, installed by whoever owns the engine (the API's app, the worker's task base).
_outboxes: weakref.WeakKeyDictionary[Engine, tuple[Database, Sender]] = weakref.WeakKeyDictionary()


def install_outbox(db: Database, send_: Sender) -> None:
    """After each commit of a session on `db`'s engine, send the deliveries it added (`send_(id)`)."""
    _outboxes[db.engine] = (db, send_)


@sa_event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    ids = session.info.pop(OUTBOX, None)
    if not ids:
        return
    target = _outboxes.get(session.get_bind())
    if target is None:  # no sender in this process: the requeuer sends them
        return
    for delivery_id in ids:
        send(target[1], target[0], delivery_id)


@sa_event.listens_for(Session, "after_rollback")
def _after_rollback(session: Session) -> None:
    session.info.pop(OUTBOX, None)  # those rows are gone with the transaction


def lease_s(settings: Settings) -> float:
    """How long one attempt may hold its delivery: the POST's timeout plus room for DNS and the two writes."""
    return settings.webhook_timeout_s + 30.0


def retry_delay(settings: Settings, attempt: int) -> float:
    """Seconds after failed attempt number `attempt` (1-based) before the next one: base * 2^(attempt-1)."""
    return min(settings.webhook_retry_base_s * 2 ** max(attempt - 1, 0), settings.webhook_retry_max_s)


def requeue_due(db: Database, send_: Sender, settings: Settings) -> list[uuid.UUID]:
    """Re-send pending deliveries whose attempt is overdue by more than a lease: their message was lost (a
    broker restart) or their worker died mid-attempt. Sending twice is harmless: attempts are claimed. One
    sent in the last REQUEUE_SPACING_S is left alone, so a message merely waiting for a busy worker does
    not gain a duplicate every round."""
    now = utcnow()
    overdue = now - timedelta(seconds=lease_s(settings))
    recently = now - timedelta(seconds=max(REQUEUE_SPACING_S, lease_s(settings)))
    with db.session() as s:
        ids = list(s.scalars(select(WebhookDelivery.id).where(
            WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at < overdue,
            WebhookDelivery.enqueued_at.is_(None) | (WebhookDelivery.enqueued_at < recently))
                             .order_by(WebhookDelivery.next_attempt_at).limit(REQUEUE_BATCH)))
    sent = [i for i in ids if send(send_, db, i)]
    if sent:
        log.info("re-sent %d overdue webhook deliver(ies) to the broker", len(sent))
    return sent


_celery_apps: dict[tuple[str, str], Any] = {}


def broker_sender(settings: Settings) -> Sender:
    """`send(delivery_id, countdown=None)`: `spafit.deliver_webhook` on the light queue of the settings' broker
    (one Celery app per broker, kept for the process)."""
    key = (str(settings.broker_url), settings.broker_key_prefix)
    app = _celery_apps.get(key) or _celery_apps.setdefault(key, make_celery(settings))

    def send_(delivery_id: uuid.UUID, countdown: float | None = None) -> None:
        app.send_task(TASK_NAME, args=[str(delivery_id)], queue=LIGHT_QUEUE, countdown=countdown)

    return send_
