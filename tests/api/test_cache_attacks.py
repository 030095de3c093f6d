"""Attacks on the predict path's in-process caches (app/services/cache.py, keys.py, serving.py).

Everything real: Postgres (and a SQLite file), psycopg connections standing in for other replicas / an operator's
psql, child processes standing in for the worker or the CLI. The app under attack runs in this process, behind a
TCP proxy that can silently stop forwarding its cache listener's connection (a hung middlebox / a half-open TCP
connection after a network partition or a frozen database host), which a `pg_terminate_backend` does not model.

Writes that play "another process" go through raw psycopg connections (or child processes), never through an
SQLAlchemy session of this process: this process's own commits bump the app's caches through the session hook
(`_after_commit` walks every `Invalidation` of the process), which would hide what the listener misses.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from app.services.cache import LIVENESS_S
from tests.live import subprocess_env

from .adapters import LORA, SPAFIT, random_adapter, register, serve, settings_factory, tiny_backbone
from .helpers import assert_problem

WITHIN_S = 1.0  # the claim: a change anywhere is served / refused everywhere within a second
LISTENER = b"spafit-cache-listener"  # cache.APPLICATION_NAME, as it appears in the startup packet


# ----------------------------------------------------------------------------------------------- helpers
class PgProxy:
    """A TCP proxy in front of Postgres. `freeze_listener()` makes it stop forwarding (both ways, without closing
    anything) every connection whose startup packet names the cache listener: the listener's socket stays open
    and writable, its queries and the server's notifications vanish, as on a half-open connection."""

    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(64)
        self.port = self.server.getsockname()[1]
        self.frozen = threading.Event()
        self.conns: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            conn = {"client": client, "upstream": upstream, "listener": False, "seen": b""}
            with self.lock:
                self.conns.append(conn)
            threading.Thread(target=self._pump, args=(conn, client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(conn, upstream, client, False), daemon=True).start()

    def _pump(self, conn: dict[str, Any], src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if from_client and len(conn["seen"]) < 4096:
                    conn["seen"] += data
                    if LISTENER in conn["seen"]:
                        conn["listener"] = True
                if conn["listener"] and self.frozen.is_set():
                    continue  # swallowed: nobody answers, nothing is closed
                dst.sendall(data)
        except OSError:
            pass
        finally:
            if not (conn["listener"] and self.frozen.is_set()):
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

    def freeze_listener(self) -> None:
        self.frozen.set()

    def thaw(self) -> None:
        """Cut the frozen connections for good (as a TCP timeout eventually would) and forward normally again."""
        was_frozen = self.frozen.is_set()
        self.frozen.clear()
        with self.lock:
            for conn in self.conns:
                if conn["listener"] and was_frozen:
                    for s in (conn["client"], conn["upstream"]):
                        try:
                            s.shutdown(socket.SHUT_RDWR)
                            s.close()
                        except OSError:
                            pass

    def close(self) -> None:
        self.closed = True
        self.server.close()
        with self.lock:
            for conn in self.conns:
                for s in (conn["client"], conn["upstream"]):
                    try:
                        s.close()
                    except OSError:
                        pass


def _raw(pg_url: str) -> Any:
    """A psycopg connection of its own (another replica, the worker, an operator's psql): no SQLAlchemy
    session of this process is involved, so the app hears of its commits only as another process would."""
    import psycopg
    from sqlalchemy import make_url

    u = make_url(pg_url)
    return psycopg.connect(host=u.host, port=u.port, user=u.username, dbname=u.database, connect_timeout=5)


def _until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> float:
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, f"{what} did not happen within {timeout}s"
        time.sleep(0.02)
    return time.monotonic() - start


def _first_within(check: Callable[[], bool], timeout: float) -> float | None:
    """Seconds until `check()` holds, or None if it never did within `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(0.02)
    return None


def _key_entries(cache: Any) -> int:
    return sum(1 for k in list(cache._entries) if isinstance(k, tuple) and k and k[0] == "key")


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_backbone(tmp_path_factory.mktemp("tiny-attack"))


@pytest.fixture(scope="module")
def versions(base):
    return [random_adapter(base, SPAFIT, seed=21), random_adapter(base, LORA, seed=22)]


@pytest.fixture(scope="module")
def proxy(pg_url) -> Iterator[PgProxy]:
    from sqlalchemy import make_url

    u = make_url(pg_url)
    p = PgProxy(u.host, u.port)
    yield p
    p.close()


@pytest.fixture(scope="module")
def api(pg_url, proxy, redis_client, redis_url, redis_prefix, tmp_path_factory, base) -> Iterator[Any]:
    """A server-mode app (auth on) whose every database connection (pool and cache listener) goes through
    `proxy`."""
    from sqlalchemy import make_url

    url = make_url(pg_url).set(port=proxy.port).render_as_string(hide_password=False)
    with settings_factory(pg_url, redis_url, redis_prefix, tmp_path_factory.mktemp("attack-data")) as make:
        with serve(make(database_url=url, default_base_model=base, engine_device="cpu",
                        preload_base_model=True)) as client:
            _until(lambda: client.serving.cache.ready, "the cache listener connecting")
            yield client


@pytest.fixture
def healthy(api, proxy) -> Iterator[Any]:
    """The app with its listener connected and forwarding, before and after the test."""
    proxy.thaw()
    _until(lambda: api.serving.cache.ready, "the cache listener connecting")
    yield api
    proxy.thaw()
    _until(lambda: api.serving.cache.ready, "the cache listener reconnecting", timeout=15)


def _raw_header_predict(client: Any, task: str, headers: dict[str, bytes]) -> int:
    """A predict whose header values reach the app as exactly these bytes (Starlette's TestClient re-encodes
    str values as UTF-8), sent as an ASGI request on the app's own loop; the status code. (uvicorn with h11 or
    httptools passes such bytes through as they are: h11's field-vchar is `[^\\x00\\s]`.)"""
    import asyncio

    body = b'{"inputs": ["a fine film"]}'
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": f"/v1/tasks/{task}/predict", "raw_path": f"/v1/tasks/{task}/predict".encode(),
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 40000), "server": ("testserver", 80),
             "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode()),
                         *((name.lower().encode(), value) for name, value in headers.items())]}

    async def call() -> int:
        status: dict[str, int] = {}
        delivered = False

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # the client stays: no disconnect
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]

        await client.app(scope, receive, send)
        return status["code"]

    return client.portal.call(call)


def _predict(client: Any, key: Any, task: str, headers: dict[str, str] | None = None) -> Any:
    return client.post(f"/v1/tasks/{task}/predict", json={"inputs": ["a fine film"]},
                       headers=headers if headers is not None else key.headers)


def _version(client: Any, key: Any, task: str) -> int | None:
    r = _predict(client, key, task)
    return r.json().get("version") if r.status_code == 200 else None


def _two_versions(db: Any, tenant_id: Any, task: str, versions: list) -> tuple[Any, Any]:
    v1 = register(db, tenant_id, task, *versions[0])
    v2 = register(db, tenant_id, task, *versions[1], activate=False)
    return v1, v2


def _warm(client: Any, key: Any, task: str, version: int) -> None:
    """Serve `task` until its answer comes from the cache (the listener is up and the entry is stored)."""
    _until(lambda: client.serving.cache.ready, "the cache listener connecting")
    time.sleep(0.3)  # the notifications of the arrangement's own commits have landed
    digest = hashlib.sha256(key.key.encode()).hexdigest()
    _until(lambda: _version(client, key, task) == version
           and client.serving.cache.get(("task", key.tenant_id, task)) is not None
           and client.serving.cache.get(("key", digest)) is not None, f"{task} v{version} served from the cache")


# ================================================================================ the listener's connection
def test_a_listener_whose_connection_hangs_silently_keeps_serving_a_stale_version(healthy, proxy, tenant_key, db,
                                                                                 pg_url, versions):
    """A half-open listener connection (the database host frozen, a partition without a RST, a stuck middlebox):
    the listener's `conn.notifies(timeout=1.0)` returns quietly, then `conn.execute("SELECT 1")` blocks for ever
    (no statement or TCP timeout), while `ready` stays True. Another replica's activation is never heard and the
    old version is served until the entry's 60 s age limit, after which the cache keeps caching, unprotected.
    The claim: whenever the listener is lost nothing is cached, a change is served within 1 s."""
    key = tenant_key("predict")
    _, v2 = _two_versions(db, key.tenant_id, "hang", versions)
    _warm(healthy, key, "hang", 1)
    proxy.freeze_listener()
    time.sleep(0.1)
    assert healthy.serving.cache.get(("task", key.tenant_id, "hang")) is not None
    with _raw(pg_url) as conn:  # another replica activates v2 (its session hook sends the NOTIFY)
        conn.execute("UPDATE tasks SET active_version_id = %s WHERE id = %s", (v2.id, v2.task_id))
        conn.execute("NOTIFY spafit_cache")
    took = _first_within(lambda: _version(healthy, key, "hang") == 2, timeout=4.0)
    stale = healthy.serving.cache.ready
    assert took is not None, (f"still serving version 1 four seconds after another replica activated version 2 "
                              f"(the listener's connection hangs; cache ready={stale})")
    assert took < LIVENESS_S + 0.5, took  # nothing is served once the listener is silent for LIVENESS_S


def test_a_key_revoked_while_the_listener_hangs_is_still_accepted(healthy, proxy, tenant_key, db, pg_url, versions):
    """The same half-open listener connection: a key revoked by the CLI / another replica keeps working here
    for up to 60 s (`MAX_AGE_S`) instead of 1 s."""
    key = tenant_key("predict")
    register(db, key.tenant_id, "hang-key", *versions[0])
    _warm(healthy, key, "hang-key", 1)
    proxy.freeze_listener()
    time.sleep(0.1)
    assert healthy.serving.cache.get(("key", hashlib.sha256(key.key.encode()).hexdigest())) is not None
    with _raw(pg_url) as conn:  # `spafit keys revoke` in another process
        conn.execute("UPDATE api_keys SET revoked_at = now() WHERE id = %s", (key.key_id,))
        conn.execute("NOTIFY spafit_cache")
    took = _first_within(lambda: _predict(healthy, key, "hang-key").status_code == 401, timeout=4.0)
    assert took is not None, "a revoked key still served four seconds after its revocation"
    assert took < LIVENESS_S + 0.5, took  # nothing is served once the listener is silent for LIVENESS_S


def test_a_killed_listener_stops_the_cache_at_once_and_another_replicas_activation_is_served(healthy, tenant_key, db,
                                                                                           pg_url, versions):
    """Regression (held): the listener's backend terminated, then another replica activates (its NOTIFY is lost:
    nobody listens). The lost connection is noticed at once (the server's FATAL arrives on the socket), the cache
    is emptied and off, and the new version is served within a second; the listener comes back."""
    from app.services import cache

    key = tenant_key("predict")
    _, v2 = _two_versions(db, key.tenant_id, "killed", versions)
    _warm(healthy, key, "killed", 1)
    with _raw(pg_url) as conn:
        conn.autocommit = True
        killed = conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s "
                              "AND datname = current_database()", (cache.APPLICATION_NAME,)).fetchall()
        assert killed
        conn.execute("UPDATE tasks SET active_version_id = %s WHERE id = %s", (v2.id, v2.task_id))
    took = _until(lambda: _version(healthy, key, "killed") == 2, "version 2 served")
    assert took < WITHIN_S, took
    _until(lambda: healthy.serving.cache.ready, "the listener reconnecting")
    for _ in range(3):
        assert _version(healthy, key, "killed") == 2


# ========================================================================= writes the session hook never sees
@pytest.mark.parametrize("how", ["psql", "orm-session-text", "orm-session-core-table"])
def test_an_activation_written_as_plain_sql_is_never_heard(healthy, tenant_key, db, pg_url, versions, how):
    """An UPDATE of `tasks.active_version_id` written as SQL: by an operator's psql / a migration / a repair
    script (`psql`), or even through an application `Session` with `session.execute(text(...))` or a Core
    `update(Task.__table__)` (the `do_orm_execute` hook only recognises ORM `update(Task)` statements: it needs a
    `bind_mapper`; `after_flush` only sees unit-of-work changes).
    No NOTIFY is sent, no generation moves: every replica keeps serving the old version for up to 60 s.
    (Postgres itself knows of the write: a statement-level trigger on tasks / api_keys / tenants that calls
    pg_notify would cover every writer.)"""
    key = tenant_key("predict")
    _, v2 = _two_versions(db, key.tenant_id, f"raw-{how}", versions)
    _warm(healthy, key, f"raw-{how}", 1)
    if how == "psql":
        with _raw(pg_url) as conn:
            conn.execute("UPDATE tasks SET active_version_id = %s WHERE id = %s", (v2.id, v2.task_id))
    else:
        # in a child process (this process's own commits would bump the app's caches directly), through an
        # application Session, with the registry (and so the hooks) imported
        stmt = ("text('UPDATE tasks SET active_version_id = :v WHERE id = :t'), {'v': v, 't': t}"
                if how == "orm-session-text" else
                "update(Task.__table__).where(Task.__table__.c.id == t).values(active_version_id=v)")
        code = ("import sys, uuid; from sqlalchemy import text, update; from app.db import Database;"
                "from app.models import Task; import app.services.registry;"
                "v, t = uuid.UUID(sys.argv[2]), uuid.UUID(sys.argv[3]);"
                f"db = Database.from_url(sys.argv[1]); s = db.session(); s.execute({stmt});"
                "s.commit(); s.close(); db.dispose()")
        subprocess.run([sys.executable, "-c", code, pg_url, str(v2.id), str(v2.task_id)], check=True,
                       env=subprocess_env(), timeout=60)
    took = _first_within(lambda: _version(healthy, key, f"raw-{how}") == 2, timeout=3.0)
    assert took is not None, "the version activated by an SQL UPDATE was not served within 3 s (stale up to 60 s)"


def test_a_key_revoked_as_plain_sql_stays_usable(healthy, tenant_key, db, pg_url, versions):
    """`UPDATE api_keys SET revoked_at = now()` by an operator (the obvious incident response when a key leaks and
    the CLI is not at hand): the key keeps working on every replica for up to 60 s."""
    key = tenant_key("predict")
    register(db, key.tenant_id, "raw-revoke", *versions[0])
    _warm(healthy, key, "raw-revoke", 1)
    with _raw(pg_url) as conn:
        conn.execute("UPDATE api_keys SET revoked_at = now() WHERE id = %s", (key.key_id,))
    took = _first_within(lambda: _predict(healthy, key, "raw-revoke").status_code == 401, timeout=3.0)
    assert took is not None, "a key revoked by an SQL UPDATE still served after 3 s (up to 60 s)"


# ======================================================================================= the key cache
def test_one_key_spelled_many_ways_takes_many_cache_entries_and_evicts_other_tenants(healthy, tenant_key, db,
                                                                                    versions):
    """`parse_key` strips the presented value with `str.strip()`, which also strips U+00A0 and U+0085: bytes 0xA0
    and 0x85 are legal in an HTTP header value (obs-text; h11 and Starlette pass them through, latin-1), so
    `X-API-Key: <0xA0 x i>KEY<0x85 x j>` is the same valid key spelled in unboundedly many ways; the cache is
    keyed by sha256 of the raw spelling, so each spelling is a new entry. The entries are evicted oldest-stored first (a hit does not refresh them) and
    share one 10,000-entry bound with every tenant's tasks and keys: one tenant with one valid key pushes every
    other tenant's keys and active versions out (each of their requests then pays the database again), at will.
    What should hold: one key, one entry (the digest of what `parse_key` returned)."""
    cache = healthy.serving.cache
    victim = tenant_key("predict")
    attacker = tenant_key("predict")
    register(db, victim.tenant_id, "victim", *versions[0])
    register(db, attacker.tenant_id, "mine", *versions[0])
    _warm(healthy, victim, "victim", 1)
    _warm(healthy, attacker, "mine", 1)
    before = _key_entries(cache)
    raw = attacker.key.encode()
    spell = lambda i: {"X-API-Key": b"\xa0" * (i % 7) + raw + b"\x85" * (i // 7)}  # noqa: E731
    spellings = [spell(i) for i in range(1, 21)]
    for headers in spellings:
        assert _raw_header_predict(healthy, "mine", headers) == 200
    grown = _key_entries(cache) - before
    victim_digest = hashlib.sha256(victim.key.encode()).hexdigest()
    old_max = cache.max_entries
    try:  # the same with the real bound of 10,000 spellings, only slower to send
        cache.max_entries = len(cache) + 5
        for i in range(11, 11 + len(cache) + 5):
            _raw_header_predict(healthy, "mine", spell(i))
        victim_cached = cache.get(("key", victim_digest)) is not None
        victim_task_cached = cache.get(("task", victim.tenant_id, "victim")) is not None
    finally:
        cache.max_entries = old_max
    assert grown <= 1 and victim_cached and victim_task_cached, (
        f"one key took {grown} key-cache entries under {len(spellings)} spellings; then another tenant's key "
        f"cached: {victim_cached}, its active version cached: {victim_task_cached}")


def test_wrong_keys_never_enter_the_cache_and_each_pays_the_lookup(healthy, tenant_key, db, versions):
    """Regression (held): a flood of distinct wrong keys (random prefixes, and wrong secrets on a real prefix)
    stores nothing, and every one is looked up in the database (one query per request)."""
    from sqlalchemy import event

    cache = healthy.serving.cache
    key = tenant_key("predict")
    register(db, key.tenant_id, "flood", *versions[0])
    _warm(healthy, key, "flood", 1)
    entries = len(cache)
    prefix = key.key.split("_")[1]
    wrong = [f"spafit_{os.urandom(6).hex()}_{os.urandom(16).hex()}" for _ in range(40)]
    wrong += [f"spafit_{prefix}_{os.urandom(16).hex()}" for _ in range(40)]
    seen: list[str] = []
    listener = lambda *a: seen.append(a[2])  # noqa: E731
    event.listen(healthy.app.state.db.engine, "before_cursor_execute", listener)
    try:
        for w in wrong:
            assert_problem(_predict(healthy, key, "flood", headers={"X-API-Key": w}), 401)
    finally:
        event.remove(healthy.app.state.db.engine, "before_cursor_execute", listener)
    assert len(cache) == entries
    assert sum("api_keys" in q for q in seen) >= len(wrong)
    assert _predict(healthy, key, "flood").status_code == 200


def test_an_orm_change_rolled_back_in_a_savepoint_then_made_again_and_committed_is_heard(healthy, tenant_key, db,
                                                                                       pg_url, versions):
    """Regression (held): in another process, the activation flushed in a savepoint (its NOTIFY with it) that
    rolls back, then made again in the outer transaction and committed; and a NOTIFY-carrying transaction that
    rolls back as a whole changes nothing. v2 is served within a second of the commit, and only then."""
    key = tenant_key("predict")
    _, v2 = _two_versions(db, key.tenant_id, "savepoint", versions)
    _warm(healthy, key, "savepoint", 1)
    with _raw(pg_url) as conn:  # a whole transaction with its NOTIFY rolled back: nothing to hear, nothing changed
        conn.execute("UPDATE tasks SET active_version_id = %s WHERE id = %s", (v2.id, v2.task_id))
        conn.execute("NOTIFY spafit_cache")
        conn.rollback()
    time.sleep(0.3)
    assert _version(healthy, key, "savepoint") == 1
    code = ("import sys, uuid; from app.db import Database; from app.models import Task; import app.services.registry;"
            "db = Database.from_url(sys.argv[1]); s = db.session(); t = s.get(Task, uuid.UUID(sys.argv[3]));"
            "sp = s.begin_nested(); t.active_version_id = uuid.UUID(sys.argv[2]); s.flush(); sp.rollback();"
            "t.active_version_id = uuid.UUID(sys.argv[2]); s.commit(); s.close(); db.dispose()")
    subprocess.run([sys.executable, "-c", code, pg_url, str(v2.id), str(v2.task_id)], check=True,
                   env=subprocess_env(), timeout=60)
    done = time.monotonic()
    _until(lambda: _version(healthy, key, "savepoint") == 2, "version 2 served")
    assert time.monotonic() - done < WITHIN_S


# ================================================================================== tenants and races
def test_tenants_with_a_task_of_the_same_name_never_see_each_others_cached_version(healthy, tenant_key, db,
                                                                                   pg_url, versions):
    """Regression (held): tenants A and B both have task `same`; A serves v2, B v1. Cached answers stay per tenant;
    a tenant without the task gets 404 though the others' entries are warm; B's task deleted by another process is
    gone for B only."""
    a, b, c = tenant_key("predict"), tenant_key("predict"), tenant_key("predict")
    register(db, a.tenant_id, "same", *versions[0])
    register(db, a.tenant_id, "same", *versions[1])
    register(db, b.tenant_id, "same", *versions[0])
    _warm(healthy, a, "same", 2)
    _warm(healthy, b, "same", 1)
    assert_problem(_predict(healthy, c, "same"), 404)
    with _raw(pg_url) as conn:  # B's task deleted by another replica (the route's statements, and its NOTIFY)
        conn.execute("UPDATE tasks SET active_version_id = NULL WHERE tenant_id = %s AND name = 'same'",
                     (b.tenant_id,))
        conn.execute("DELETE FROM adapter_versions WHERE task_id IN (SELECT id FROM tasks WHERE tenant_id = %s)",
                     (b.tenant_id,))
        conn.execute("DELETE FROM tasks WHERE tenant_id = %s AND name = 'same'", (b.tenant_id,))
        conn.execute("NOTIFY spafit_cache")
    took = _until(lambda: _predict(healthy, b, "same").status_code == 404, "B's deleted task answering 404")
    assert took < WITHIN_S, took
    assert _version(healthy, a, "same") == 2


def test_a_lookup_held_by_a_lock_while_another_replica_activates_writes_no_stale_entry(healthy, tenant_key, db,
                                                                                     pg_url, versions):
    """Regression (held): a predict's registry read is held mid-query (another replica holds an ACCESS EXCLUSIVE
    lock on `tasks` while it activates v2); when that commits, the read goes on. Whatever it read, nothing stale
    is served afterwards."""
    key = tenant_key("predict")
    _, v2 = _two_versions(db, key.tenant_id, "held", versions)
    assert _version(healthy, key, "held") == 1
    conn = _raw(pg_url)
    try:
        healthy.serving.cache.bump()  # the entry gone: the next predict reads the registry
        conn.execute("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE")
        results: list[Any] = []
        t = threading.Thread(target=lambda: results.append(_version(healthy, key, "held")))
        t.start()
        time.sleep(0.5)  # the predict's SELECT waits for the lock
        assert t.is_alive()
        conn.execute("UPDATE tasks SET active_version_id = %s WHERE id = %s", (v2.id, v2.task_id))
        conn.execute("NOTIFY spafit_cache")
        conn.commit()
    finally:
        conn.close()
    t.join(30)
    assert results and results[0] in (1, 2)
    time.sleep(0.3)
    for _ in range(5):
        assert _version(healthy, key, "held") == 2


def test_a_key_whose_scopes_another_process_narrows_loses_predict_within_a_second(healthy, tenant_key, db, pg_url,
                                                                                  versions):
    """Regression (held): the key's scopes changed through the ORM in another process (its session hook sends the
    NOTIFY): the cached principal is dropped and predict answers 403 within a second."""
    key = tenant_key("predict", "train")
    register(db, key.tenant_id, "scoped", *versions[0])
    _warm(healthy, key, "scoped", 1)
    code = ("import sys, uuid; from app.db import Database; from app.models import ApiKey; import app.services.cache;"
            "db = Database.from_url(sys.argv[1]); s = db.session(); k = s.get(ApiKey, uuid.UUID(sys.argv[2]));"
            "k.scopes = ['train']; s.commit(); s.close(); db.dispose()")
    proc = subprocess.Popen([sys.executable, "-c", code, pg_url, str(key.key_id)], env=subprocess_env())
    assert proc.wait(60) == 0
    done = time.monotonic()
    _until(lambda: _predict(healthy, key, "scoped").status_code == 403, "the narrowed key refused")
    assert time.monotonic() - done < WITHIN_S


# ================================================================================================= SQLite
def test_sqlite_a_key_revoked_by_another_process_is_refused_within_a_second(tmp_path, base, versions, monkeypatch):
    """Regression (held): embedded mode on a SQLite file with auth on; a version activated by a raw sqlite3
    connection (no SQLAlchemy, no hook: the sqlite3 shell's way) and then the key revoked by another process
    (the CLI's path) are both noticed by the API's `PRAGMA data_version` poller within a second."""
    import sqlite3

    from app.db import Database
    from app.services import keys, migrate
    from app.settings import Settings

    for name in [n for n in os.environ if n.startswith("SPAFIT_") and not n.startswith("SPAFIT_TEST_")]:
        monkeypatch.delenv(name)
    url = f"sqlite:///{tmp_path / 'spafit.db'}"
    migrate.upgrade(url)
    sdb = Database.from_url(url)
    with sdb.session() as s:
        tenant = keys.create_tenant(s, "sqlite-tenant")
        row, plaintext = keys.create_key(s, tenant.id, "k", ["predict"])
        tenant_id, key_id = tenant.id, row.id
    register(sdb, tenant_id, "lite", *versions[0])
    v2 = register(sdb, tenant_id, "lite", *versions[1], activate=False)
    sdb.dispose()
    headers = {"Authorization": f"Bearer {plaintext}"}
    settings = Settings(_env_file=None, mode="embedded", database_url=url, data_dir=tmp_path, default_base_model=base,
                        engine_device="cpu", preload_base_model=True, auth_enabled=True,
                        insecure_bind=True, allowed_hosts=["testserver"])
    with serve(settings) as client:
        ask = lambda: client.post("/v1/tasks/lite/predict", json={"inputs": ["x"]}, headers=headers)  # noqa: E731
        assert ask().status_code == 200
        _until(lambda: client.serving.cache.ready, "the SQLite poller starting")
        digest = hashlib.sha256(plaintext.encode()).hexdigest()
        # (the key's first use writes its last_used_at: that commit moves data_version, and the poller empties
        # the caches once more a moment later)
        _until(lambda: ask().json().get("version") == 1 and client.serving.cache.get(("key", digest)) is not None
               and client.serving.cache.get(("task", tenant_id, "lite")) is not None, "the key and version cached")
        raw = sqlite3.connect(tmp_path / "spafit.db")
        try:
            stored = raw.execute("SELECT active_version_id FROM tasks WHERE name = 'lite'").fetchone()[0]
            new_id = v2.id.hex if len(str(stored)) == 32 else str(v2.id)
            raw.execute("UPDATE tasks SET active_version_id = ? WHERE name = 'lite'", (new_id,))
            raw.commit()
        finally:
            raw.close()
        took = _until(lambda: ask().json().get("version") == 2, "the raw sqlite3 activation served")
        assert took < WITHIN_S, took
        code = ("import uuid, sys; from app.db import Database; from app.services import keys;"
                "db = Database.from_url(sys.argv[1]); s = db.session();"
                "keys.revoke_key(s, uuid.UUID(sys.argv[2]), uuid.UUID(sys.argv[3])); s.close(); db.dispose()")
        subprocess.run([sys.executable, "-c", code, url, str(tenant_id), str(key_id)], check=True,
                       env=subprocess_env(), timeout=60)
        done = time.monotonic()
        _until(lambda: ask().status_code == 401, "the revoked key refused")
        assert time.monotonic() - done < WITHIN_S



# ============================================================================================ bad deploys
@pytest.mark.parametrize("query", ["application_name=spafit-api", "connect_timeout=10"])
def test_a_database_url_with_common_connection_options_still_gets_a_listener(pg_url, query):
    """`SPAFIT_DATABASE_URL=...?application_name=spafit-api` (how DBAs tell services apart in pg_stat_activity) or
    `?connect_timeout=10`: the listener passes the URL's query as keyword arguments next to its own
    `application_name=` / `connect_timeout=`, so `psycopg.connect` raises TypeError (multiple values for one
    keyword) on every try. The cache never turns on, silently (the warning is only logged once it had been ready):
    every predict pays the database, on every replica, for ever."""
    from app.services.cache import Invalidation

    inv = Invalidation(f"{pg_url}?{query}").start()
    try:
        _until(lambda: inv.ready, f"the cache listener connecting with ?{query}", timeout=3.0)
    finally:
        inv.stop()


def test_sqlite_uri_database_url_poller_watches_the_database_the_app_uses(tmp_path, base, versions, monkeypatch):
    """Regression (held here): `sqlite:///file:/path/spafit.db?uri=true` (SQLAlchemy's URI form): the engine opens
    /path/spafit.db with `uri=True`; the poller calls `sqlite3.connect(make_url(url).database)` without it. That
    works only because this SQLite build has SQLITE_USE_URI=1 (Debian's); where it does not, the poller opens a
    relative file literally named `file:/path/spafit.db` (whose folder `make_engine` creates relative to the
    working directory), an empty database whose data_version never moves."""
    from app.db import Database
    from app.services import keys, migrate
    from app.settings import Settings

    for name in [n for n in os.environ if n.startswith("SPAFIT_") and not n.startswith("SPAFIT_TEST_")]:
        monkeypatch.delenv(name)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # where make_engine's stray `file:` folder lands
    url = f"sqlite:///file:{tmp_path / 'spafit.db'}?uri=true"
    migrate.upgrade(url)
    sdb = Database.from_url(url)
    with sdb.session() as s:
        tenant = keys.ensure_local_tenant(s).id
    register(sdb, tenant, "local", *versions[0])
    register(sdb, tenant, "local", *versions[1], activate=False)
    sdb.dispose()
    assert (tmp_path / "spafit.db").exists()
    settings = Settings(_env_file=None, mode="embedded", database_url=url, data_dir=tmp_path, default_base_model=base,
                        engine_device="cpu", preload_base_model=True,
                        insecure_bind=True, allowed_hosts=["testserver"])
    with serve(settings) as client:
        ask = lambda: client.post("/v1/tasks/local/predict", json={"inputs": ["x"]}).json().get("version", 0)  # noqa: E731
        assert ask() == 1
        _until(lambda: client.serving.cache.ready, "the SQLite poller starting")
        assert ask() == 1 and ask() == 1
        code = ("import uuid,sys; from app.db import Database; from app.services import registry;"
                "db=Database.from_url(sys.argv[1]); s=db.session();"
                "registry.activate(s, uuid.UUID(sys.argv[2]), 'local', 2); s.close(); db.dispose()")
        subprocess.run([sys.executable, "-c", code, url, str(tenant)], check=True, env=subprocess_env(),
                       timeout=60, cwd=work)
        took = _until(lambda: ask() == 2, "another process's activation served")
        assert took < WITHIN_S, took
