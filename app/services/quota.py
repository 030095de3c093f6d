"""Per-tenant storage quota (`SPAFIT_TENANT_MAX_STORED_BYTES`): every tenant's bytes live in the one database all
tenants share, so one tenant's uploads, imports and batch results must not fill it for the others.

What a tenant stores is counted at each item's own size (content is shared between items by hash, but each item
is charged in full, so deleting one always frees what it was charged): its datasets (`size_bytes`), its tasks'
adapter versions (`size_bytes`) and its batch predictions' result chunks (their bytes). Checkpoints and sweep trial
results are a running job's scratch, dropped when it ends, and are not counted.

`reserve` is called where bytes are about to be stored, in the transaction that stores them, after taking the
tenant's row lock (`app.db.lock_tenant`: FOR NO KEY UPDATE on Postgres, the database's write lock on SQLite):
writers of one tenant take turns, so two concurrent uploads or imports cannot both pass the check on the same room.
A trained adapter is registered without a check (refusing it would throw away a finished run), so a tenant can pass
its quota by the adapters of the jobs it started while below it; new jobs are refused from then on.
"""

from __future__ import annotations

import uuid

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ..db import lock_tenant
from ..errors import StorageQuotaExceeded
from ..models import AdapterVersion, BatchChunk, Dataset, Job, Task
from .blobs import byte_length

_NAMES = {"datasets": "datasets", "adapters": "adapter versions", "batch_results": "batch prediction results"}


def usage(session: Session, tenant_id: uuid.UUID) -> dict[str, int]:
    """Bytes stored by the tenant, by kind (see the module's docstring)."""
    datasets = session.scalar(select(func.coalesce(func.sum(Dataset.size_bytes), 0))
                              .where(Dataset.tenant_id == tenant_id))
    adapters = session.scalar(select(func.coalesce(func.sum(AdapterVersion.size_bytes), 0))
                              .join(Task, Task.id == AdapterVersion.task_id).where(Task.tenant_id == tenant_id))
    results = session.scalar(select(func.coalesce(func.sum(byte_length(BatchChunk.data)), 0))
                             .join(Job, Job.id == BatchChunk.job_id).where(Job.tenant_id == tenant_id))
    return {"datasets": int(datasets), "adapters": int(adapters), "batch_results": int(results)}


def reserve(session: Session, limit: int, tenant_id: uuid.UUID, adding: int, what: str, *,
            field: str | None = None, lock: bool = True) -> None:
    """Refuse (`StorageQuotaExceeded`, 403) storing `adding` more bytes for the tenant past `limit` (0: no limit).
    `adding` = 0 asks whether the tenant has any room left (a job that will store its result). Takes the tenant's
    row lock first; call it in the transaction that stores the bytes. `lock=False`: an early look only, before
    costly work (parsing an upload), which the locked check where the bytes are stored then decides."""
    if not limit:
        return
    if lock:
        lock_tenant(session, tenant_id)
    by_kind = usage(session, tenant_id)
    used = sum(by_kind.values())
    if used + adding <= limit and (adding or used < limit):
        return
    parts = ", ".join(f"{_NAMES[k]} {_size(v)}" for k, v in by_kind.items() if v)
    adds = f"; {what} adds {_size(adding)}" if adding else f"; {what} needs room it has not"
    raise StorageQuotaExceeded(
        f"this tenant stores {_size(used)} of the {_size(limit)} it may store (SPAFIT_TENANT_MAX_STORED_BYTES)"
        f"{f': {parts}' if parts else ''}{adds}. Delete datasets, tasks or finished batch predictions to make room "
        "(GET /v1/usage shows where the bytes are)", field=field, limit_bytes=limit, used_bytes=used,
        adding_bytes=adding, used_by_kind=by_kind)


def _size(n: int) -> str:
    """Bytes in words: exact below 10 kB, else about three significant figures in decimal units, never in
    exponent form (999,999 bytes is "1000 kB", 2 TB is "2000 GB")."""
    if n < 10_000:
        return f"{n} bytes"
    unit, scale = next((u, s) for u, s in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)) if n >= s)
    value = n / scale
    digits = 2 if value < 10 else 1 if value < 100 else 0
    return f"{value:.{digits}f} {unit}"
