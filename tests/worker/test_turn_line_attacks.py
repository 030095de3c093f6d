"""Attacks on two changes: the webhook turn line (worker/webhooks.py `_place_in_line`, migration 0008's
`webhook_deliveries.waiting_turn`) and the per-tenant storage quota's edges (app/services/quota.py, macro-F1 in
spafit_core/metrics.py rewritten with bincount). Tests marked `# BUG:` fail on the code they were written against;
the others are attacks that held, kept for the coverage they add."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta

import numpy as np
import pytest
from sqlalchemy import select, update

from tests.worker.test_webhooks import _ended_job_in, _ended_job_with_delivery

URL = "http://127.0.0.1:9/hook"  # never reached: every attempt here waits for its turn


def _line_settings(make_settings, **kw):
    base = dict(webhook_allow_private_urls=True, webhook_timeout_s=2.0, webhook_tenant_share=0.1,
                webhook_tenant_burst_s=1.0, broker_key_prefix=f"unconsumed-{uuid.uuid4().hex}:")
    base.update(kw)
    return make_settings(**base)


def _take_turn(db, tenant_id, seconds=11.0):
    from app.models import Tenant, utcnow

    with db.transaction() as s:
        s.execute(update(Tenant).where(Tenant.id == tenant_id)
                  .values(webhook_busy_until=utcnow() + timedelta(seconds=seconds)))


def _due(db, delivery_id):
    from app.models import WebhookDelivery

    with db.session() as s:
        return s.get(WebhookDelivery, delivery_id).next_attempt_at


def _horizon_s(settings) -> float:
    from app.services import webhooks

    return settings.webhook_tenant_burst_s + webhooks.lease_s(settings) / settings.webhook_tenant_share


def _nosend(delivery_id, countdown=None):
    pass


# ------------------------------------------------------------------------------------------- the turn line
# BUG: a waiting row due far ahead (a worker whose clock ran fast) puts every later waiter of the tenant behind it
def test_a_stale_far_future_waiting_row_does_not_push_the_tenants_line_past_its_horizon(db, make_settings,
                                                                                       tenant_key):
    """The tenant's clock is clamped to its horizon (burst + lease / share) exactly because a worker's clock may
    run fast or settings may change; the line is not: one waiting row due a day ahead (written by a worker whose
    clock was a day fast, or under a much smaller share since raised) makes every delivery of the tenant that must
    wait even a second wait a day behind it. Before the line, a waiting delivery waited at most the horizon."""
    from app.models import WebhookDelivery, utcnow
    from worker.webhooks import TURN_SPACING_S, deliver

    settings = _line_settings(make_settings)
    key = tenant_key("train")
    stale = _ended_job_with_delivery(db, key.tenant_id, URL)[1]
    fresh = _ended_job_with_delivery(db, key.tenant_id, URL)[1]
    with db.transaction() as s:
        s.execute(update(WebhookDelivery).where(WebhookDelivery.id == stale)
                  .values(waiting_turn=True, next_attempt_at=utcnow() + timedelta(days=1)))
    _take_turn(db, key.tenant_id, seconds=11)  # about 10 s of turn left past the burst
    assert deliver(db, fresh, settings, _nosend) == "deferred"
    wait = (_due(db, fresh) - utcnow()).total_seconds()
    assert wait <= _horizon_s(settings) + 2 * TURN_SPACING_S, f"waits {wait:.0f} s behind one stale row"


# BUG: on SQLite (embedded mode) the tenant "lock" is no lock: concurrent deferrals read the same line, take one slot
def test_concurrent_deferrals_on_sqlite_get_distinct_slots(tmp_path, monkeypatch):
    """pysqlite begins a transaction at the first write and SQLite ignores FOR UPDATE, so deliver()'s reads of the
    tenant and of the line run before any lock: two workers deferring the same tenant at once both read the same
    last slot and both take the one after it (woken together again, what the line was for). The quota takes the
    write lock with a no-op UPDATE for this reason; the line does not."""
    import worker.webhooks as ww
    from app.db import Database
    from app.models import Tenant, utcnow
    from app.services import keys, migrate
    from app.settings import Settings

    url = f"sqlite:///{tmp_path / 'spafit.db'}"
    migrate.upgrade(url)
    settings = Settings(_env_file=None, mode="embedded", data_dir=tmp_path, database_url=url,
                        webhook_timeout_s=2.0, webhook_tenant_share=0.1, webhook_tenant_burst_s=1.0,
                        broker_url="memory://")
    db = Database.from_url(url)
    try:
        with db.session() as s:
            tenant_id = keys.create_tenant(s, "line").id
        from app.models import WebhookDelivery

        ids = []
        for _ in range(3):
            with db.transaction() as s:
                job_id = _ended_job_in(s, tenant_id, URL, status="failed")
            with db.session() as s:
                ids.append(s.scalar(select(WebhookDelivery.id).where(WebhookDelivery.job_id == job_id)))
        with db.transaction() as s:
            s.execute(update(Tenant).where(Tenant.id == tenant_id)
                      .values(webhook_busy_until=utcnow() + timedelta(seconds=11)))
        assert ww.deliver(db, ids[0], settings, _nosend) == "deferred"  # the head of the line

        original, barrier = ww._place_in_line, threading.Barrier(2)

        def placed_then_paused(*a):
            wait = original(*a)
            try:  # both have read the line before either writes (on Postgres the tenant's row lock serialises)
                barrier.wait(3)
            except threading.BrokenBarrierError:
                pass
            return wait

        monkeypatch.setattr(ww, "_place_in_line", placed_then_paused)
        results, errors = [], []

        def run(i):
            try:
                results.append(ww.deliver(db, i, settings, _nosend))
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

        threads = [threading.Thread(target=run, args=(i,)) for i in ids[1:]]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert results == ["deferred", "deferred"]
        a, b = (_due(db, i) for i in ids[1:])
        assert abs((a - b).total_seconds()) >= ww.TURN_SPACING_S - 0.05, (a, b)
    finally:
        db.dispose()


def test_concurrent_deferrals_on_postgres_get_distinct_slots(db, make_settings, tenant_key, monkeypatch):
    """The same race on Postgres: the tenant's row lock (FOR NO KEY UPDATE) is taken before the line is read, so
    the second deferral reads the first one's slot and goes after it."""
    import worker.webhooks as ww

    settings = _line_settings(make_settings)
    key = tenant_key("train")
    ids = [_ended_job_with_delivery(db, key.tenant_id, URL)[1] for _ in range(3)]
    _take_turn(db, key.tenant_id)
    assert ww.deliver(db, ids[0], settings, _nosend) == "deferred"
    original, barrier = ww._place_in_line, threading.Barrier(2)

    def placed_then_paused(*a):
        wait = original(*a)
        try:
            barrier.wait(2)
        except threading.BrokenBarrierError:
            pass
        return wait

    monkeypatch.setattr(ww, "_place_in_line", placed_then_paused)
    results: list[str] = []
    threads = [threading.Thread(target=lambda i=i: results.append(ww.deliver(db, i, settings, _nosend)))
               for i in ids[1:]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == ["deferred", "deferred"]
    slots = sorted(_due(db, i) for i in ids)
    gaps = [(b - a).total_seconds() for a, b in zip(slots, slots[1:], strict=False)]
    assert all(g >= ww.TURN_SPACING_S - 0.05 for g in gaps), gaps


def test_rows_left_marked_waiting_by_a_past_slot_or_another_status_do_not_hold_the_line(db, make_settings,
                                                                                      tenant_key):
    """An overdue waiting row (its message lost: the requeuer's business), and rows that ended while marked
    waiting (failed, delivered) or belong to another tenant, do not move a new waiter's slot; a claim clears the
    mark; the requeuer re-sends an overdue waiting row and it goes to the back of the line, using no attempt."""
    from app.models import WebhookDelivery, utcnow
    from app.services import webhooks
    from worker.webhooks import TURN_SPACING_S, deliver

    settings = _line_settings(make_settings)
    key, other = tenant_key("train"), tenant_key("train")
    past, failed, done, fresh = (_ended_job_with_delivery(db, key.tenant_id, URL)[1] for _ in range(4))
    foreign = _ended_job_with_delivery(db, other.tenant_id, URL)[1]
    now = utcnow()
    with db.transaction() as s:
        s.execute(update(WebhookDelivery).where(WebhookDelivery.id == past)
                  .values(waiting_turn=True, next_attempt_at=now - timedelta(hours=2)))
        s.execute(update(WebhookDelivery).where(WebhookDelivery.id.in_([failed, done]))
                  .values(waiting_turn=True, next_attempt_at=now + timedelta(days=3)))
        s.execute(update(WebhookDelivery).where(WebhookDelivery.id == failed).values(status="failed"))
        s.execute(update(WebhookDelivery).where(WebhookDelivery.id == done).values(status="delivered"))
        s.execute(update(WebhookDelivery).where(WebhookDelivery.id == foreign)
                  .values(waiting_turn=True, next_attempt_at=now + timedelta(days=3)))
    _take_turn(db, key.tenant_id, seconds=11)
    assert deliver(db, fresh, settings, _nosend) == "deferred"
    wait = (_due(db, fresh) - utcnow()).total_seconds()
    assert 5 < wait < 11, wait
    sent: list = []
    requeued = webhooks.requeue_due(db, lambda i, countdown=None: sent.append(i), settings)
    with db.session() as s:
        enqueued = s.get(WebhookDelivery, past).enqueued_at
    # the live servers on the session's database run a requeue loop every 2 s: one may have re-sent it first (seen
    # in a clean-clone CI run), which stamps it as just sent
    assert past in requeued or (enqueued is not None and (utcnow() - enqueued).total_seconds() < 60), enqueued
    assert deliver(db, past, settings, _nosend) == "deferred"
    assert (_due(db, past) - _due(db, fresh)).total_seconds() >= TURN_SPACING_S - 0.05
    with db.session() as s:
        assert s.get(WebhookDelivery, past).attempts == 0


@pytest.mark.parametrize("share,burst", [(0.01, 0.0), (1.0, 0.0), (0.01, 3600.0)])
def test_the_line_at_the_settings_bounds(db, make_settings, tenant_key, share, burst):
    """Share at its floor (0.01) and burst 0: waits stay within horizon + line, the deliveries stay in line."""
    from app.models import utcnow
    from worker.webhooks import TURN_SPACING_S, deliver

    settings = _line_settings(make_settings, webhook_tenant_share=share, webhook_tenant_burst_s=burst)
    key = tenant_key("train")
    ids = [_ended_job_with_delivery(db, key.tenant_id, URL)[1] for _ in range(3)]
    _take_turn(db, key.tenant_id, seconds=burst + 30)
    assert [deliver(db, i, settings, _nosend) for i in ids] == ["deferred"] * 3
    times = [_due(db, i) for i in ids]
    assert all((b - a).total_seconds() >= TURN_SPACING_S - 0.05 for a, b in zip(times, times[1:], strict=False))
    assert (times[-1] - utcnow()).total_seconds() <= _horizon_s(settings) + 3 * TURN_SPACING_S


def test_the_deliveries_listing_does_not_show_the_waiting_mark(db, make_settings, tenant_key, client):
    from worker.webhooks import deliver

    settings = _line_settings(make_settings)
    key = tenant_key("train")
    delivery = _ended_job_with_delivery(db, key.tenant_id, URL)[1]
    _take_turn(db, key.tenant_id)
    assert deliver(db, delivery, settings, _nosend) == "deferred"
    r = client.get("/v1/webhooks/deliveries", headers=key.headers)
    assert r.status_code == 200, r.text
    [item] = [i for i in r.json()["items"] if i["id"] == str(delivery)]
    assert "waiting_turn" not in item and item["status"] == "pending" and item["attempts"] == 0


# ------------------------------------------------------------------------------------------- migration 0008
def _migration_round_trip(url):
    from app.db import Database
    from app.models import WebhookDelivery
    from app.services import keys, migrate

    migrate.upgrade(url)
    db = Database.from_url(url)
    try:
        with db.session() as s:
            tenant_id = keys.create_tenant(s, "mig").id
        with db.transaction() as s:
            _ended_job_in(s, tenant_id, URL, status="failed")
        with db.transaction() as s:
            s.execute(update(WebhookDelivery).values(waiting_turn=True))
    finally:
        db.dispose()
    migrate.downgrade(url, "0007")
    migrate.upgrade(url)
    db = Database.from_url(url)
    try:
        with db.session() as s:
            rows = list(s.scalars(select(WebhookDelivery)))
        assert [(r.status, r.waiting_turn) for r in rows] == [("pending", False)]
    finally:
        db.dispose()


def test_migration_0008_down_and_up_keeps_the_deliveries_on_sqlite(tmp_path):
    _migration_round_trip(f"sqlite:///{tmp_path / 'spafit.db'}")


def test_migration_0008_down_and_up_keeps_the_deliveries_on_postgres(empty_pg_url):
    _migration_round_trip(empty_pg_url)


# ------------------------------------------------------------------------------------------- macro-F1
def _old_macro_f1(predictions, labels, num_labels=None):
    """macro_f1 as it was before the bincount rewrite (commit 457bfa1)."""
    from spafit_core.metrics import _f1_counts, _ids

    p, y = _ids(predictions, labels)
    classes = np.arange(num_labels) if num_labels is not None else np.unique(np.concatenate([p, y]))
    scores = [_f1_counts(np.sum((p == c) & (y == c)), np.sum((p == c) & (y != c)), np.sum((p != c) & (y == c)))
              for c in classes]
    return float(np.mean(scores))


@pytest.mark.parametrize("p,y,k", [
    ([0, 1, -1], [0, -1, -1], 3), ([0, 1, 5], [0, 5, 1], 3), ([0.0, 1.0, 1.5], [0, 1, 1], 2),
    (["a", "b"], ["a", "a"], None), (["1", "0"], [1, 0], 2), ([True, False], [1, 0], 2),
    ([np.nan, 1.0], [0.0, 1.0], 2), ([np.inf, 1.0], [1.0, 1.0], 2), ([2**63 + 1, 1], [1, 1], 2),
    ([2**64 - 1, 0], [0, 0], 2), ([-0.0, 1], [0, 1], 2), ([1e20, 0], [0, 0], 2), ([3, 3], [3, 3], 2),
    ([1.0, 0.0], [1, 0], None), ([-3, 2, 2], [2, -3, 2], None),
])
def test_macro_f1_matches_the_old_definition_on_odd_inputs(p, y, k):
    import warnings

    from spafit_core.metrics import macro_f1

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert macro_f1(p, y, num_labels=k) == pytest.approx(_old_macro_f1(p, y, num_labels=k))


# BUG: an object-dtype array of whole numbers (pandas' object columns, a list with a None) scores as matching nothing
def test_macro_f1_of_object_arrays_of_class_ids_matches_the_old_definition():
    """`_class_ids` turns every non-numeric dtype into -1, object arrays included: `macro_f1` of the same ids held in
    an object array (what a pandas object column's `.values` gives) dropped from 1.0 to 0.0 with num_labels."""
    from spafit_core.metrics import macro_f1

    p = np.array([0, 1, 1, 2], dtype=object)
    y = np.array([0, 1, 1, 2], dtype=object)
    assert _old_macro_f1(p, y, num_labels=3) == 1.0
    assert macro_f1(p, y, num_labels=3) == 1.0
    assert macro_f1([1, None, 0], [1, 0, 0], num_labels=2) == pytest.approx(_old_macro_f1([1, None, 0], [1, 0, 0], 2))


# ------------------------------------------------------------------------------------------- quota on SQLite
def test_sqlite_quota_writers_next_to_an_open_read_transaction_and_batch_chunks_all_finish(tmp_path):
    """The quota's no-op UPDATE takes SQLite's write lock at the start of each storing transaction. With a reader
    holding a read transaction open the whole time (WAL: readers never block the writer), concurrent uploads'
    reserves and a batch result chunk's reserve all finish, none with "database is locked", and the room is kept."""
    import sqlite3

    from app.db import Database
    from app.models import BatchChunk, Dataset, Job
    from app.services import keys, migrate, quota
    from tests.api.helpers import dataset_row, race_reservations

    path = tmp_path / "embedded.db"
    url = f"sqlite:///{path}"
    migrate.upgrade(url)
    db = Database.from_url(url)
    with db.session() as s:
        keys.ensure_local_tenant(s)
    tenant = keys.LOCAL_TENANT_ID
    with db.transaction() as s:
        ds = Dataset(tenant_id=tenant, name="src", format="csv", columns=[], text_fields=[], report={}, rows=1,
                     size_bytes=0)
        s.add(ds)
        s.flush()
        job = Job(tenant_id=tenant, kind="predict", task_name="t", base_model="x", train_dataset_id=ds.id,
                  text_fields=["text"], method={}, hyperparameters={}, status="running")
        s.add(job)
        s.flush()
        job_id = job.id
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM datasets").fetchone()  # a read transaction held open throughout
    limit = 6000

    def row(i: int):  # half of them result chunks, half datasets
        return BatchChunk(job_id=job_id, chunk=i, rows=1, data=b"x" * 1000) if i % 2 else dataset_row(tenant, i)

    try:
        stored, refused, errors = race_reservations(db, tenant, limit, row, join_s=90)
        with db.session() as s:
            used = sum(quota.usage(s, tenant).values())
    finally:
        reader.execute("ROLLBACK")
        reader.close()
        db.dispose()
    assert not errors, errors
    assert used <= limit and (len(stored), len(refused)) == (6, 2), (used, stored, refused)
