"""Deliveries that wait for their tenant's webhook turn wait in line (worker/webhooks.py `_place_in_line`). Before,
every waiting delivery of a tenant was put off to the same moment: all woke together, one took the turn and each of
the others made a worker lock the tenant's row and check it again, N checks a turn for N waiting deliveries, none
of it charged to the tenant."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

from sqlalchemy import update

from tests.worker.test_webhooks import _ended_job_with_delivery


def test_deliveries_waiting_for_their_tenants_turn_wake_one_at_a_time(db, make_settings, tenant_key):
    from app.models import Tenant, WebhookDelivery, utcnow
    from worker.webhooks import TURN_SPACING_S, deliver

    settings = make_settings(webhook_allow_private_urls=True, webhook_timeout_s=2.0, webhook_tenant_share=0.1,
                             webhook_tenant_burst_s=1.0, broker_key_prefix=f"unconsumed-{uuid.uuid4().hex}:")
    a, b = tenant_key("train"), tenant_key("train")
    url = "http://127.0.0.1:9/hook"  # never reached: every attempt here waits for its turn
    ids = [_ended_job_with_delivery(db, a.tenant_id, url)[1] for _ in range(6)]
    other = _ended_job_with_delivery(db, b.tenant_id, url)[1]
    with db.transaction() as s:  # both tenants' turns taken for about 10 s past their burst
        s.execute(update(Tenant).where(Tenant.id.in_([a.tenant_id, b.tenant_id]))
                  .values(webhook_busy_until=utcnow() + timedelta(seconds=11)))
    fires: dict[uuid.UUID, float] = {}  # when each message is due on the broker (monotonic clock)

    def send(i, countdown=None):
        fires[uuid.UUID(str(i))] = time.monotonic() + (countdown or 0.0)

    assert [deliver(db, i, settings, send) for i in [*ids, other]] == ["deferred"] * 7

    def due(delivery_id):
        with db.session() as s:
            return s.get(WebhookDelivery, delivery_id).next_attempt_at

    times = [due(i) for i in ids]
    gaps = [(later - earlier).total_seconds() for earlier, later in zip(times, times[1:], strict=False)]
    assert all(g >= TURN_SPACING_S - 0.05 for g in gaps), gaps  # in line, one after another (was: all at once)
    first_wait = (times[0] - utcnow()).total_seconds()
    assert 5 < first_wait < 11, first_wait
    assert fires[ids[-1]] - fires[ids[0]] >= 5 * (TURN_SPACING_S - 0.05), fires  # on the broker too
    # another tenant's delivery is in its own line: it waits for b's turn only, not behind a's deliveries
    assert abs((due(other) - times[0]).total_seconds()) < 1.0
    # the head woken while the turn is still taken (its message fired early) goes to the back of the line
    with db.transaction() as s:
        s.execute(update(WebhookDelivery).where(WebhookDelivery.id == ids[0]).values(next_attempt_at=utcnow()))
    assert deliver(db, ids[0], settings, send) == "deferred"
    assert (due(ids[0]) - times[-1]).total_seconds() >= TURN_SPACING_S - 0.05
    with db.session() as s:  # no attempt was used by waiting
        assert {s.get(WebhookDelivery, i).attempts for i in ids} == {0}
