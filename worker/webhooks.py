"""Webhook delivery attempts: what the `spafit.deliver_webhook` task runs (app/services/webhooks.py makes the
deliveries, in the transaction that ends a job).

One attempt: claim the delivery (a compare-and-swap on its attempt count that also leases it for
`lease_s`), resolve and vet the URL again, POST the signed body to the very address it vetted, then record
the outcome on the row and as a `webhook` job event in one transaction, and on failure send the task
again with the backoff delay. At least once: an attempt whose worker dies is retried after its lease by
the API's requeuer; receivers drop duplicates by `webhook-id`.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from datetime import datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

import httpx
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from app.db import Database, lock_tenant
from app.models import Job, Tenant, WebhookDelivery, utcnow
from app.services import events, webhooks
from app.settings import Settings

log = logging.getLogger("spafit.worker.webhooks")

TURN_SPACING_S = 0.25  # between two deliveries of one tenant waiting for its turn (see _place_in_line)
EARLY_TOLERANCE_S = 1.0  # a message may fire this much before its row says the attempt is due
RECORD_TRIES = 4  # writing an attempt's outcome, over about 3.5 s
TOTAL_TIMEOUT_GRACE_S = 5.0
MAX_ADDRESSES = 3  # of a host's (vetted) addresses, tried in order while they refuse the connection  # one whole POST: webhook_timeout_s plus this (well inside the lease)


# ------------------------------------------------------------------------------ tenants' turns
# The workers (one process by default) run every tenant's webhook attempts and training jobs. An attempt to a
# receiver that hangs holds a worker for the whole timeout (10 s + grace by default, up to ten attempts a
# delivery), and a tenant could make deliveries in a loop (create and cancel jobs): each tenant's attempts get a
# share of the workers' time instead, kept as a virtual clock on its row (GCRA: `Tenant.webhook_busy_until`). An
# attempt of d seconds moves the clock d / share on from max(clock, now); while it runs more than the burst ahead
# of now, the tenant's next attempt waits (re-sent with the delay, using no attempt) and the others go first.
# An attempt takes its turn when it starts (the most it may take: `attempt_limit_s`), under the row's lock, and
# returns what it did not use when it ends: several workers starting the same tenant's attempts at once take turns
# too, instead of all reading a clock none of them has charged yet.
def attempt_limit_s(settings: Settings) -> float:
    """The longest one POST may take (httpx bounds each read, this the whole exchange)."""
    return settings.webhook_timeout_s + TOTAL_TIMEOUT_GRACE_S


def _horizon(now: datetime, settings: Settings) -> datetime:
    """The furthest ahead a tenant's clock can run under the current settings: an attempt started at the burst's
    edge and charged its whole lease. One further ahead (a worker whose clock ran fast, charges made under a much
    smaller share since raised) is taken as this far: else it held the tenant's webhooks back for as long."""
    return now + timedelta(seconds=settings.webhook_tenant_burst_s
                           + webhooks.lease_s(settings) / settings.webhook_tenant_share)


def turn_wait(tenant: Tenant | None, now: datetime, settings: Settings) -> float:
    """Seconds before `tenant`'s next webhook attempt may run (0: now)."""
    busy = tenant.webhook_busy_until if tenant is not None else None
    if busy is None:
        return 0.0
    busy = min(busy, _horizon(now, settings))
    return max(0.0, (busy - now).total_seconds() - settings.webhook_tenant_burst_s)


def charge_turn(s: Session, tenant_id: uuid.UUID, seconds: float, settings: Settings) -> None:
    """Count `seconds` of attempts against a tenant's share (negative: return what an attempt took and did not
    use), in the transaction that claims or records the attempt."""
    # FOR NO KEY UPDATE: a job ending meanwhile inserts a delivery (a key-share lock on the tenant) and does not wait
    lock_tenant(s, tenant_id)
    tenant = s.get(Tenant, tenant_id, populate_existing=True)
    if tenant is None:
        return
    now = utcnow()
    start = min(max(tenant.webhook_busy_until or now, now), _horizon(now, settings))
    tenant.webhook_busy_until = start + timedelta(seconds=seconds / settings.webhook_tenant_share)


def _place_in_line(s: Session, d: WebhookDelivery, now: datetime, wait: float) -> float:
    """Seconds this delivery waits for its tenant's turn: `wait`, or, where others of the tenant already wait, until
    TURN_SPACING_S after the last of them. Waiting deliveries wake one at a time (a woken one that still finds no
    turn goes to the back): a tenant with N waiting costs the workers a check per TURN_SPACING_S, not N per turn."""
    last, waiting = s.execute(select(func.max(WebhookDelivery.next_attempt_at), func.count()).where(
        WebhookDelivery.tenant_id == d.tenant_id, WebhookDelivery.status == "pending",
        WebhookDelivery.waiting_turn.is_(True), WebhookDelivery.id != d.id)).one()
    if last is None:
        return wait
    # never further than the line can be: a row due far ahead (written by a worker whose clock ran fast, or under a
    # much smaller share since raised) does not put every later waiter behind it
    return max(wait, min((last - now).total_seconds(), wait + waiting * TURN_SPACING_S) + TURN_SPACING_S)


# ------------------------------------------------------------------------------ one attempt
def _post(url: str, payload: dict, secrets: list[str], msg_id: str, settings: Settings) -> tuple[int | None, str | None]:
    """(status code, error in words). Connects to the addresses `resolve` vetted (the next one only if the
    previous refused the connection), with the URL's host in the Host header and TLS SNI (so certificates are
    checked against the name), following no redirects."""
    try:
        host, port, addresses = webhooks.resolve(url, settings)
    except webhooks.UrlRefused as e:
        log.info("webhook to %s refused: %s", url, e)
        return None, f"refused: {e.public}"  # the row's error is the tenant's to read: no inside address
    parts = urlsplit(url)
    body = webhooks.body_bytes(payload)
    headers = webhooks.headers(secrets, msg_id, int(time.time()), body)
    # Host and SNI carry the name as it goes on the wire: an internationalised one in its IDNA (xn--) form, as
    # getaddrinfo resolved it (httpx sends header values as ASCII and raised on `bücher.example`)
    name = host if host.isascii() else host.encode("idna").decode("ascii")
    headers["host"] = parts.netloc if parts.netloc.isascii() else \
        (name if parts.port is None else f"{name}:{parts.port}")
    extensions = {"sni_hostname": name} if parts.scheme == "https" else {}
    answer: list[tuple[int | None, str | None]] = []
    clients: list[httpx.Client] = []

    def call() -> None:
        for n, ip in enumerate(addresses[:MAX_ADDRESSES]):
            pinned = urlunsplit((parts.scheme, f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}",
                                 parts.path or "/", parts.query, ""))
            try:
                client = httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False, trust_env=False)
                clients.append(client)
                with client, \
                        client.stream("POST", pinned, content=body, headers=headers, extensions=extensions) as r:
                    code = r.status_code  # the body is never read: a receiver cannot make us hold megabytes
                answer.append((code, None if 200 <= code < 300 else f"HTTP {code}"))
                return
            except httpx.ConnectError as e:
                if n + 1 < min(len(addresses), MAX_ADDRESSES) and "certificate" not in str(e).lower():
                    continue  # nothing listens there (e.g. ::1 first for a server on 127.0.0.1): the next
                answer.append((None, f"{e.__class__.__name__}: {str(e)[:300]}"))
                return
            except Exception as e:  # httpx.HTTPError mostly; whatever it is, it is this attempt's error
                answer.append((None, f"{e.__class__.__name__}: {str(e)[:300]}"))
                return

    # httpx's timeout bounds each read, not the whole exchange: a receiver dribbling its headers a byte at a
    # time could hold the attempt past its lease. The attempt waits this long in all, then counts as failed.
    limit = attempt_limit_s(settings)
    thread = threading.Thread(target=call, name="webhook-post", daemon=True)
    thread.start()
    thread.join(limit)
    if thread.is_alive():  # cut the connection: else the thread and its socket live on for as long as the
        for client in list(clients):  # receiver keeps dribbling (hours), one more per attempt
            client.close()
    return answer[0] if answer else (None, f"no complete answer within {limit:g} s")


def deliver(db: Database, delivery_id: uuid.UUID | str, settings: Settings,
            send_: webhooks.Sender | None = None) -> str:
    """One attempt at delivery `delivery_id`. Returns delivered | retrying | failed, or final / not-due /
    busy when there was nothing to do (a duplicate or early message)."""
    delivery_id = uuid.UUID(str(delivery_id))
    now = utcnow()
    with db.transaction() as s:
        d = s.get(WebhookDelivery, delivery_id)
        if d is None or d.status != "pending":
            return "final"
        if d.next_attempt_at > now + timedelta(seconds=EARLY_TOLERANCE_S):
            return "not-due"  # a duplicate, or another attempt holds the lease; the requeuer covers a loss
        # the tenant's row held to the commit (its clock read fresh): the tenant's attempts starting at once take turns
        # (on SQLite too, where FOR UPDATE is no lock: `lock_tenant` takes the write lock before the reads)
        lock_tenant(s, d.tenant_id)
        tenant = s.get(Tenant, d.tenant_id, populate_existing=True)
        wait = turn_wait(tenant, now, settings)
        if wait > 0:  # the tenant's attempts ran ahead of its share of the workers' time: this one waits its turn
            if tenant.webhook_busy_until > _horizon(now, settings):  # taken as this far ahead, and kept so
                tenant.webhook_busy_until = _horizon(now, settings)
            wait = _place_in_line(s, d, now, wait)
            deferred = s.execute(update(WebhookDelivery).where(
                WebhookDelivery.id == delivery_id, WebhookDelivery.status == "pending",
                WebhookDelivery.attempts == d.attempts,
            ).values(next_attempt_at=now + timedelta(seconds=wait), waiting_turn=True, last_error=(
                f"waiting {wait:.0f} s for this tenant's turn: its webhook attempts used their share of the workers' "
                "time (receivers slow to answer); no attempt is used")))
            if deferred.rowcount != 1:
                return "busy"
        else:
            attempt = d.attempts + 1
            claimed = s.execute(update(WebhookDelivery).where(
                WebhookDelivery.id == delivery_id, WebhookDelivery.status == "pending",
                WebhookDelivery.attempts == d.attempts,
            ).values(attempts=attempt, next_attempt_at=now + timedelta(seconds=webhooks.lease_s(settings)),
                     waiting_turn=False))
            if claimed.rowcount != 1:
                return "busy"
            charge_turn(s, d.tenant_id, attempt_limit_s(settings), settings)  # its turn, taken now
            secrets = webhooks.signing_secrets(tenant, settings)
            url, payload, job_id, event, tenant_id = d.url, d.payload, d.job_id, d.event, d.tenant_id
    if wait > 0:
        log.info("webhook %s waits %.1f s for its tenant's turn", delivery_id, wait)
        webhooks.send(send_ or webhooks.broker_sender(settings), db, delivery_id, countdown=wait)
        return "deferred"
    max_attempts = settings.webhook_max_attempts

    started = time.monotonic()
    code, error = _post(url, payload, secrets, webhooks.message_id(delivery_id), settings)
    elapsed = time.monotonic() - started

    now = utcnow()
    delay: float | None = None
    if error is None:
        outcome, values = "delivered", {"status": "delivered", "finished_at": now}
    elif attempt >= max_attempts:
        outcome, values = "failed", {"status": "failed", "finished_at": now}
    else:
        delay = webhooks.retry_delay(settings, attempt)
        outcome, values = "retrying", {"next_attempt_at": now + timedelta(seconds=delay)}
    record = {"delivery_id": str(delivery_id), "event": event, "attempt": attempt, "max_attempts": max_attempts,
              "outcome": outcome, "status_code": code, "error": error, "seconds": round(elapsed, 3),
              "next_retry_in_s": delay,
              "next_retry_at": values["next_attempt_at"].isoformat() if delay is not None else None}
    for i in range(RECORD_TRIES):  # the database may be briefly away; if it stays away, the lease runs out
        try:                       # and the requeuer sends the delivery again (at least once)
            with db.transaction() as s:
                # what the attempt did not use of the turn it took (the tenant's row first, as when it was claimed)
                charge_turn(s, tenant_id, elapsed - attempt_limit_s(settings), settings)
                s.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id,
                                                        WebhookDelivery.attempts == attempt)
                          .values(last_status_code=code, last_error=error, **values))
                if s.get(Job, job_id) is not None:  # a job deleted meanwhile took its deliveries with it
                    events.append_in(s, job_id, "webhook", record)
            break
        except (OperationalError, InterfaceError, IntegrityError):
            if i == RECORD_TRIES - 1:
                raise
            time.sleep(0.5 * 2 ** i)
    log.info("webhook %s (%s) attempt %d/%d: %s%s", delivery_id, event, attempt, max_attempts, outcome,
             f" ({error})" if error else "")
    if delay is not None:
        webhooks.send(send_ or webhooks.broker_sender(settings), db, delivery_id, countdown=delay)
    return outcome
