"""Content-addressed blob store in the registry database: bytes keyed by their sha256, written once,
verified on every read. Datasets, adapters and checkpoints all live here, so API and worker replicas need
nothing shared but the database. Writes join the caller's transaction; nothing here commits."""

from __future__ import annotations

import hashlib
from typing import Any

from sqlalchemy import Column, delete, exists, func, or_, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..errors import BlobIntegrityError, NotFound
from ..models import Blob, utcnow


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put(session: Session, data: bytes) -> str:
    """Store `data` (if it is not there yet) and return its sha256. Safe when two writers race on the same
    content. If the row exists, its `created_at` is moved to now: that locks the row until the caller's
    transaction ends, so the collector (app/services/retention.py) cannot delete it between this call and
    the row that will reference it, and its grace period counts from the last store."""
    sha = sha256_hex(data)
    values = {"sha256": sha, "size": len(data), "data": data, "created_at": utcnow()}
    dialect = session.get_bind().dialect.name
    if dialect in ("postgresql", "sqlite"):
        insert = pg_insert if dialect == "postgresql" else sqlite_insert
        stmt = insert(Blob).values(**values)
        session.execute(stmt.on_conflict_do_update(index_elements=["sha256"],
                                                   set_={"created_at": stmt.excluded.created_at}))
    elif session.get(Blob, sha) is None:  # other backends: plain check-then-insert
        session.add(Blob(**values))
        session.flush()
    return sha


def contains(session: Session, sha: str) -> bool:
    return session.scalar(select(exists().where(Blob.sha256 == sha))) or False


def size(session: Session, sha: str) -> int:
    n = session.scalar(select(Blob.size).where(Blob.sha256 == sha))
    if n is None:
        raise NotFound(f"blob {sha} not found")
    return n


def get(session: Session, sha: str) -> bytes:
    """The bytes of blob `sha`, checked against their hash; `BlobIntegrityError` if they do not match."""
    row = session.execute(select(Blob.data, Blob.size).where(Blob.sha256 == sha)).first()
    if row is None:
        raise NotFound(f"blob {sha} not found")
    data = bytes(row.data)
    if len(data) != row.size or sha256_hex(data) != sha:
        raise BlobIntegrityError(f"blob {sha} is corrupted: its bytes no longer match their sha256")
    return data


def references() -> list[Column]:
    """Every column with a foreign key to blobs.sha256 (datasets, adapter versions, job checkpoints and trial
    results, and whatever is added later), read from the schema."""
    target = Blob.__table__.c.sha256
    return [fk.parent for table in Blob.metadata.sorted_tables for fk in table.foreign_keys
            if fk.column is target]


def is_referenced(session: Session, sha: str) -> bool:
    return bool(session.scalar(select(or_(*(exists().where(col == sha) for col in references())))))


def delete_if_unreferenced(session: Session, sha: str) -> bool:
    """Drop blob `sha` if no dataset, adapter version or job checkpoint points at it. The foreign keys
    make this safe against a concurrent new reference: that transaction or this one fails, never both win."""
    if is_referenced(session, sha):
        return False
    return session.execute(delete(Blob).where(Blob.sha256 == sha)).rowcount > 0


def drop_if_unreferenced(session: Session, sha: str) -> bool:
    """`delete_if_unreferenced` in a savepoint: where another transaction (another tenant's, maybe: blobs are shared
    by content) takes a new reference to the same bytes meanwhile, only this delete rolls back, never the caller's
    transaction, and the blob stays for that reference."""
    try:
        with session.begin_nested():
            return delete_if_unreferenced(session, sha)
    except IntegrityError:
        return False


def byte_length(column: Any) -> Any:
    """A binary column's length in bytes: `length()` counts bytes of a Postgres bytea and of a SQLite BLOB alike
    (`octet_length` only exists from SQLite 3.43, and the embedded service runs on the SQLite Python ships)."""
    return func.length(column)
