"""Content-addressed blob store in the registry database: bytes keyed by their sha256, written once,
verified on every read. Datasets, adapters and checkpoints all live here, so API and worker replicas need
nothing shared but the database. Writes join the caller's transaction; nothing here commits."""

from __future__ import annotations

import hashlib

from sqlalchemy import delete, exists, or_, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from ..errors import BlobIntegrityError, NotFound
from ..models import AdapterVersion, Blob, Dataset, Job, utcnow


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put(session: Session, data: bytes) -> str:
    """Store `data` (if it is not there yet) and return its sha256. Safe when two writers race on the same
    content: the insert does nothing if the row exists."""
    sha = sha256_hex(data)
    values = {"sha256": sha, "size": len(data), "data": data, "created_at": utcnow()}
    dialect = session.get_bind().dialect.name
    if dialect in ("postgresql", "sqlite"):
        insert = pg_insert if dialect == "postgresql" else sqlite_insert
        session.execute(insert(Blob).values(**values).on_conflict_do_nothing(index_elements=["sha256"]))
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


def is_referenced(session: Session, sha: str) -> bool:
    return bool(session.scalar(select(or_(
        exists().where(Dataset.sha256 == sha),
        exists().where(AdapterVersion.blob_sha256 == sha),
        exists().where(Job.checkpoint_sha256 == sha),
        exists().where(Job.result_sha256 == sha),
    ))))


def delete_if_unreferenced(session: Session, sha: str) -> bool:
    """Drop blob `sha` if no dataset, adapter version or job checkpoint points at it. The foreign keys
    make this safe against a concurrent new reference: that transaction or this one fails, never both win."""
    if is_referenced(session, sha):
        return False
    return session.execute(delete(Blob).where(Blob.sha256 == sha)).rowcount > 0
