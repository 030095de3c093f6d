"""Tenants and API keys: create, list, revoke, authenticate. The CLI's `keys create|list|revoke` and the
auth dependency call these; mutating functions commit their own transaction."""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from ..db import Database
from ..errors import Conflict, InvalidInput, NotFound, Unauthorized
from ..models import ApiKey, Tenant, utcnow
from ..security import Principal, check_scopes, hash_secret, new_key, parse_key, verify_secret
from ..settings import SCOPES
from .cache import Invalidation

# The built-in tenant every request acts as when auth is off (embedded mode only).
LOCAL_TENANT_ID = uuid.UUID("00000000-0000-0000-0000-000000000001")
LOCAL_TENANT_NAME = "local"
LAST_USED_RESOLUTION = timedelta(minutes=1)  # write last_used_at at most this often per key
_DUMMY_HASH = hash_secret("not-a-key")
NAME_MAX = 100  # the tenants.name and api_keys.name columns
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0 and C1 controls: no line breaks or terminal escapes in `keys list`
# Unicode's own line and paragraph separators and its bidirectional controls (U+202E turns `keys list`'s line around,
# so a name reads as another): as unwelcome in a label for people as a C0 line break
_FORMAT = re.compile("[\u2028\u2029\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_SURROGATE = re.compile("[\ud800-\udfff]")  # a command line's bytes that are not UTF-8: no name has them, none can


def check_name(name: str, what: str, *, field: str = "name") -> str:
    """`name` if it can label a tenant or key: 1-100 characters, not blank, no control characters; else a 422
    naming `field` (the CLI takes names as they come: without this an empty name was stored, and a long one or
    a NUL failed in the database with its SQL)."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidInput(f"a {what} name cannot be empty", field=field)
    if len(name) > NAME_MAX:
        raise InvalidInput(f"a {what} name has at most {NAME_MAX} characters (this one has {len(name)})", field=field)
    if _CONTROL.search(name) or _FORMAT.search(name):
        raise InvalidInput(f"a {what} name cannot contain control characters (line breaks, terminal escapes, "
                           "bidirectional controls)", field=field)
    if _SURROGATE.search(name):  # else the database's encoder failed on it, a traceback after the tenant was made
        raise InvalidInput(f"a {what} name must be valid UTF-8", field=field)
    return name


def local_principal() -> Principal:
    return Principal(tenant_id=LOCAL_TENANT_ID, key_id=None, scopes=frozenset(SCOPES))


def create_tenant(session: Session, name: str) -> Tenant:
    tenant = Tenant(name=check_name(name, "tenant"))
    session.add(tenant)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise Conflict(f"tenant {name!r} already exists", field="name") from None
    return tenant


def get_tenant(session: Session, name_or_id: str | uuid.UUID) -> Tenant:
    """A tenant by id or by name (a name that reads as a UUID is still found by name)."""
    try:
        tenant = session.get(Tenant, uuid.UUID(str(name_or_id)))
    except ValueError:
        tenant = None
    # a NUL or a lone surrogate (bytes of a command line that are not UTF-8) is in no name, and SQL refuses them
    if tenant is None and "\x00" not in str(name_or_id) and not _SURROGATE.search(str(name_or_id)):
        tenant = session.scalar(select(Tenant).where(Tenant.name == str(name_or_id)))
    if tenant is None:
        raise NotFound(f"tenant {name_or_id!s} not found")
    return tenant


def ensure_local_tenant(session: Session) -> Tenant:
    """The built-in `local` tenant, created on first use (idempotent, safe if two processes race)."""
    tenant = session.get(Tenant, LOCAL_TENANT_ID)
    if tenant is not None:
        return tenant
    session.add(Tenant(id=LOCAL_TENANT_ID, name=LOCAL_TENANT_NAME))
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
    return session.get(Tenant, LOCAL_TENANT_ID)


def create_key(session: Session, tenant: Tenant | uuid.UUID, name: str, scopes: list[str]) -> tuple[ApiKey, str]:
    """A new key for `tenant`: (row, plaintext). The plaintext is not stored: show it once."""
    try:
        scopes = check_scopes(scopes)
    except ValueError as e:
        raise InvalidInput(str(e), field="scopes") from None
    name = check_name(name, "key")
    tenant_id = tenant.id if isinstance(tenant, Tenant) else tenant
    prefix, secret, plaintext = new_key()
    key = ApiKey(tenant_id=tenant_id, name=name, prefix=prefix, secret_hash=hash_secret(secret), scopes=scopes)
    session.add(key)
    session.commit()
    return key, plaintext


def list_keys(session: Session, tenant_id: uuid.UUID, *, include_revoked: bool = True) -> list[ApiKey]:
    query = select(ApiKey).where(ApiKey.tenant_id == tenant_id).order_by(ApiKey.created_at, ApiKey.id)
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    return list(session.scalars(query))


def revoke_key(session: Session, tenant_id: uuid.UUID, key: uuid.UUID | str) -> ApiKey:
    """Revoke a key of `tenant_id` by id or prefix. Idempotent: revoking twice keeps the first time."""
    try:
        row = session.get(ApiKey, uuid.UUID(str(key)))
    except ValueError:
        row = session.scalar(select(ApiKey).where(ApiKey.prefix == str(key)))
    if row is None or row.tenant_id != tenant_id:
        raise NotFound(f"API key {key!s} not found")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.commit()
    return row


def authenticate(session: Session, plaintext: str) -> Principal:
    """The principal of a presented key; `Unauthorized` if it is malformed, unknown, wrong or revoked."""
    parsed = parse_key(plaintext)
    if parsed is None:
        raise Unauthorized("malformed API key; expected spafit_<prefix>_<secret>")
    prefix, secret = parsed
    key = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
    # Compare even when the prefix is unknown, so timing does not tell which prefixes exist.
    ok = verify_secret(secret, key.secret_hash if key is not None else _DUMMY_HASH)
    if key is None or not ok or key.revoked_at is not None:
        raise Unauthorized("invalid or revoked API key")
    now = utcnow()
    if key.last_used_at is None or now - key.last_used_at > LAST_USED_RESOLUTION:
        key.last_used_at = now
        session.commit()
    return Principal(tenant_id=key.tenant_id, key_id=key.id, scopes=frozenset(key.scopes))


def authenticate_cached(cache: Invalidation, plaintext: str) -> Principal | None:
    """The principal of a key verified before and unchanged everywhere since (a revocation in any replica
    empties every cache within a second), or None: then `authenticate` it. The cache is keyed by the sha256 of
    the whole presented key, so a hit needs the key itself; a failure is never cached, so every wrong guess
    pays the database lookup and the constant-time compare as before."""
    return cache.get(("key", _digest(plaintext)))


def authenticate_fresh(db: Database, cache: Invalidation, plaintext: str) -> Principal:
    """`authenticate` against the database (blocking: call it from a thread), caching a success."""
    generation = cache.generation  # read before the database: a revocation meanwhile drops what we read
    with db.session() as session:
        principal = authenticate(session, plaintext)
    cache.put(("key", _digest(plaintext)), principal, generation)
    return principal


def key_active(db: Database, key_id: uuid.UUID) -> bool:
    """Whether key `key_id` still exists unrevoked (blocking: call it from a thread)."""
    with db.session() as session:
        return session.scalar(select(ApiKey.id).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))) is not None


def still_valid(db: Database, cache: Invalidation, principal: Principal) -> Callable[[], Awaitable[bool]]:
    """For a long-lived request (a live event stream): an async check that the key it opened with is not revoked
    since. It asks the database only after the cache was invalidated (any key change in any replica bumps its
    generation within a second); otherwise it costs nothing."""
    seen = cache.generation

    async def check() -> bool:
        nonlocal seen
        if principal.key_id is None:  # auth off
            return True
        generation = cache.generation
        if generation == seen:
            return True
        try:
            ok = await run_in_threadpool(key_active, db, principal.key_id)
        except SQLAlchemyError:  # the database is away: the stream's own read fails and asks for a reconnect
            return True
        if ok:
            seen = generation
        return ok

    return check


def _digest(plaintext: str) -> str:
    """The cache's name for a key: of the key as `parse_key` reads it (stripped), so that one key spelled with
    other surrounding whitespace (U+00A0 and U+0085 are legal header bytes) is one entry, not one per spelling."""
    return hashlib.sha256(plaintext.strip().encode()).hexdigest()
