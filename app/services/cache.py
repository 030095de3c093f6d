"""In-process caches of what every predict request reads (a task's active version, an API key's principal),
kept true across replicas by invalidation rather than by asking the database on each request.

`Invalidation` is one generation counter per process. It moves when the registry or the keys may have changed:
- whenever this process commits a change to a task's active version, a task, or an API key (the session hook
  below, which also sends `NOTIFY spafit_cache` inside the same transaction on Postgres);
- in server mode (Postgres), when a `LISTEN spafit_cache` connection hears another process's commit;
- on SQLite (embedded), when `PRAGMA data_version` says another connection (a worker process, another API
  process) committed anything, polled every `POLL_S`.
Every move empties the caches. Until the listener runs (and whenever its connection is lost) the caches hold
nothing, so a request then reads the database as if there were no cache: a missed notification can never
leave a stale answer behind. "Lost" includes a connection that hangs without closing (a frozen database host, a
partition without a reset): the listener proves its connection at least every `LIVENESS_S / 4` (a notification
or `SELECT 1`), and nothing is served or stored while the last proof is older than `LIVENESS_S`; TCP keepalives
and a user timeout then fail the hung connection and the listener reconnects. On Postgres the notification comes
from statement triggers on the watched columns (migration 0009) as well as from the session hook, so a change
written as plain SQL (psql, a repair script, a Core statement) is heard too. An entry is only stored under the generation it was read at (`put(..., gen)`), so
a read that raced an invalidation is dropped rather than cached. Only positive answers are cached: an unknown
task or an invalid key always goes to the database (and through the key's hash and constant-time compare).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

from sqlalchemy import event, inspect
from sqlalchemy.orm import Session

from ..models import ApiKey, Task, Tenant

log = logging.getLogger("spafit.cache")

CHANNEL = "spafit_cache"
POLL_S = 0.2  # SQLite: how often `PRAGMA data_version` is read; the listener's reconnect backoff starts here
MAX_AGE_S = 60.0  # an entry is read again after this long even without any invalidation (belt and braces)
# Entries are served only this long after the listener last proved its connection alive (it tries every quarter of
# it). Under many threads contending for the GIL the listener's proofs were measured 0.6-0.9 s apart, and over 1 s
# once with the machine loaded: 1.5 s keeps the caches from switching off under load.
LIVENESS_S = 1.5
APPLICATION_NAME = "spafit-cache-listener"  # the LISTEN connection, as pg_stat_activity shows it

_live: weakref.WeakSet[Invalidation] = weakref.WeakSet()  # every Invalidation of this process


class Invalidation:
    """A generation counter and the caches it empties; `start()` runs the cross-process listener."""

    def __init__(self, database_url: str, *, max_entries: int = 10_000, max_age_s: float = MAX_AGE_S):
        self.url = database_url
        self.max_entries = max_entries
        self.max_age_s = max_age_s
        self.generation = 0
        self.ready = False  # the listener is connected: entries may be stored
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()  # key -> (stored at, value), oldest first
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._alive_until = 0.0  # monotonic: the listener proved its connection up to LIVENESS_S before this
        _live.add(self)

    # -- the cache
    def get(self, key: Hashable) -> Any | None:
        """The value stored under `key`, or None (never stored, invalidated, too old, or the cache is off).
        Lock-free (one dict read, atomic under the GIL): this runs on the event loop for every request. The
        size bound evicts the oldest stored first."""
        hit = self._entries.get(key)
        now = time.monotonic()
        if hit is None or now - hit[0] > self.max_age_s or self._deaf(now):
            return None
        return hit[1]

    def put(self, key: Hashable, value: Any, generation: int) -> None:
        """Store `value`, read from the database when the generation was `generation`: dropped if anything
        was invalidated since (the read may predate the change) or the listener is not running."""
        with self._lock:
            if generation != self.generation or not self.ready or self._deaf(time.monotonic()):
                return
            self._entries.pop(key, None)  # a refreshed entry counts as new
            self._entries[key] = (time.monotonic(), value)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def discard(self, key: Hashable) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def bump(self) -> None:
        """Something may have changed: forget everything (every replica does this on a notification)."""
        with self._lock:
            self.generation += 1
            self._entries.clear()

    def _deaf(self, now: float) -> bool:
        """The listener runs but has not proved its connection for LIVENESS_S (a half-open connection, a hung
        server): a notification may be lost on the way, so nothing is served or stored."""
        return self._thread is not None and now > self._alive_until

    def _alive(self) -> None:
        """The listener's connection answered just now. If it had been silent past its deadline, what is cached
        may have missed a notification: forget it."""
        now = time.monotonic()
        with self._lock:
            if now > self._alive_until:
                self.generation += 1
                self._entries.clear()
            self._alive_until = now + LIVENESS_S

    def __len__(self) -> int:
        return len(self._entries)

    # -- the listener
    def start(self) -> Invalidation:
        if self._thread is None:
            from sqlalchemy import make_url

            from ..settings import normalize_database_url

            backend = make_url(normalize_database_url(self.url)).get_backend_name()
            target = self._listen_postgres if backend == "postgresql" else self._poll_sqlite
            self._thread = threading.Thread(target=target, name="spafit-cache-listener", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._set_ready(False)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _set_ready(self, ready: bool) -> None:
        with self._lock:
            self.ready = ready
            self.generation += 1  # what was read while nobody listened may be stale
            self._entries.clear()

    def _listen_postgres(self) -> None:
        import psycopg
        from sqlalchemy import make_url

        from ..settings import normalize_database_url

        u = make_url(normalize_database_url(self.url))
        params = {k: v for k, v in {"host": u.host, "port": u.port, "user": u.username, "password": u.password,
                                    "dbname": u.database}.items() if v is not None}
        params.update({k: v for k, v in u.query.items() if isinstance(v, str)})  # sslmode and the like
        params.setdefault("connect_timeout", "5")
        params["application_name"] = APPLICATION_NAME  # the URL's own would be a second keyword: TypeError
        # a peer that vanished without a RST (partition, frozen host) fails the connection instead of hanging it
        params.update(keepalives="1", keepalives_idle="5", keepalives_interval="1", keepalives_count="3",
                      tcp_user_timeout="3000")
        backoff = POLL_S
        while not self._stop.is_set():
            try:
                with psycopg.connect(autocommit=True, **params) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._set_ready(True)
                    self._alive()
                    backoff = POLL_S
                    while not self._stop.is_set():
                        heard = False
                        for _ in conn.notifies(timeout=LIVENESS_S / 4, stop_after=1):  # leaves time to be late
                            heard = True
                        if heard:  # one bump covers every notification queued behind this one
                            self.bump()
                        else:  # a quiet moment: make sure the connection is still there to hear the next
                            conn.execute("SELECT 1")
                        self._alive()
            except Exception as e:
                if self._stop.is_set():
                    return
                if self.ready or backoff == POLL_S:
                    log.warning("cache listener lost its connection (%s); caches off until it is back", e)
                self._set_ready(False)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def _poll_sqlite(self) -> None:
        import sqlite3

        from sqlalchemy import make_url

        path = make_url(self.url).database or ":memory:"
        while not self._stop.is_set():
            try:
                conn = sqlite3.connect(path, timeout=5, check_same_thread=False)
                try:
                    last = conn.execute("PRAGMA data_version").fetchone()[0]
                    self._set_ready(True)
                    self._alive()
                    while not self._stop.wait(POLL_S):
                        now = conn.execute("PRAGMA data_version").fetchone()[0]
                        if now != last:  # another connection committed: anything may have changed
                            last = now
                            self.bump()
                        self._alive()
                finally:
                    conn.close()
            except Exception as e:
                if self._stop.is_set():
                    return
                log.warning("cache poller failed (%s); caches off until it is back", e)
                self._set_ready(False)
                self._stop.wait(1.0)


# ------------------------------------------------------------------------------------------ the session hook
_WATCHED_ON_CHANGE = {Task: ("active_version_id", "name", "tenant_id"),
                      ApiKey: ("revoked_at", "scopes", "tenant_id", "secret_hash", "prefix")}


def _touches_caches(session: Session) -> bool:
    for obj in session.deleted:
        if isinstance(obj, Task | ApiKey | Tenant):
            return True
    for obj in session.dirty:
        fields = _WATCHED_ON_CHANGE.get(type(obj))
        if fields is not None:
            state = inspect(obj)
            if any(state.attrs[f].history.has_changes() for f in fields):
                return True
    return False


@event.listens_for(Session, "after_flush")
def _after_flush(session: Session, _context: Any) -> None:
    if not _touches_caches(session):
        return  # (NOTIFY again on each such flush: one in a rolled-back savepoint is gone; Postgres merges repeats)
    session.info["spafit_cache_dirty"] = True
    conn = session.connection()
    if conn.dialect.name == "postgresql":  # delivered to every listener when (and only if) this commits
        conn.exec_driver_sql(f"NOTIFY {CHANNEL}")


@event.listens_for(Session, "do_orm_execute")
def _bulk(state: Any) -> None:
    """A bulk UPDATE/DELETE of tasks, keys or tenants (not through the unit of work) invalidates too."""
    if not (state.is_update or state.is_delete):
        return
    mapper = state.bind_mapper
    if mapper is not None and mapper.class_ in (Task, ApiKey, Tenant):
        session = state.session
        session.info["spafit_cache_dirty"] = True
        conn = session.connection()
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"NOTIFY {CHANNEL}")


@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    if session.info.pop("spafit_cache_dirty", False):
        for inv in list(_live):  # this process's own caches at once; other processes through NOTIFY or polling
            inv.bump()


@event.listens_for(Session, "after_rollback")
def _after_rollback(session: Session) -> None:
    session.info.pop("spafit_cache_dirty", None)
