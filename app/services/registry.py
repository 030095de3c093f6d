"""The adapter registry: tasks per tenant and their immutable adapter versions.

A version's weights (adapter.safetensors) are a content-addressed blob; its config is a JSON column.
Registering a version checks the adapter's own sha256 first; the unique `job_id` makes it impossible for
one job to register two versions. A new version becomes the task's active one; `activate` rolls back.
Everything is tenant-scoped: another tenant's task is `NotFound`, like a missing one.
"""

from __future__ import annotations

import logging
import math
import re
import typing
import uuid
from collections.abc import Sequence

from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..errors import Conflict, NotFound
from ..models import AdapterVersion, Job, Task
from ..schemas import DB_INT_MAX, AdapterVersionOut, TaskOut, TaskType
from . import blobs
from . import cache as _cache  # noqa: F401 (its session hooks tell every replica's caches of a change made here)
from .pagination import paginate

log = logging.getLogger("spafit.registry")
TASK_TYPES = typing.get_args(TaskType)
TASK_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
TASK_NAME_RULE = "1-64 characters: lowercase letters, digits, '-' and '_', starting with a letter or digit"


def check_task_name(name: str) -> str:
    from spafit_core.errors import ConfigError

    if not isinstance(name, str) or not TASK_NAME.fullmatch(name):
        raise ConfigError(f"invalid task name {name!r}: {TASK_NAME_RULE}", field="task")
    return name


def get_task(session: Session, tenant_id: uuid.UUID, name: str) -> Task:
    task = session.scalar(select(Task).where(Task.tenant_id == tenant_id, Task.name == name))
    if task is None:
        raise NotFound(f"task {name!r} not found")
    return task


def get_or_create_task(session: Session, tenant_id: uuid.UUID, name: str) -> Task:
    check_task_name(name)
    task = session.scalar(select(Task).where(Task.tenant_id == tenant_id, Task.name == name))
    if task is not None:
        return task
    try:
        with session.begin_nested():
            task = Task(tenant_id=tenant_id, name=name)
            session.add(task)
            session.flush()
    except IntegrityError:  # created concurrently
        task = session.scalar(select(Task).where(Task.tenant_id == tenant_id, Task.name == name))
    return task


def register_version(session: Session, tenant_id: uuid.UUID, task_name: str, cfg: dict, weights: bytes, *,
                     job_id: uuid.UUID | None = None, activate: bool = True) -> AdapterVersion:
    """Store an adapter as the task's next version (inside the caller's transaction). A job that already
    registered one gets that one back instead of a second. The whole config is checked by one schema first
    (`spafit_core.adapter.validate_config`); an imported adapter (no job) also against its backbone's limits
    (max_seq_length within the position table, the depth), read from the backbone's config. Nothing is
    written before these pass."""
    from spafit_core.adapter import backbone_limits, check_backbone, load_weights, parse_config
    from spafit_core.train import check_finite

    cfg = parse_config(cfg)
    if job_id is None:  # a trained adapter was made on this backbone; an imported one says what it likes
        check_backbone(cfg, backbone_limits(cfg["base_model"]["name"]))
    check_finite(load_weights(cfg, weights))  # sha256 and safetensors structure, never a pickle; no NaN tensors
    if job_id is not None:
        existing = session.scalar(select(AdapterVersion).where(AdapterVersion.job_id == job_id))
        if existing is not None:
            return existing
    task = get_or_create_task(session, tenant_id, task_name)
    # Lock the task row so two registrations cannot take the same number (Postgres; SQLite serialises writers).
    # A task deleted between finding it and the lock is made again (a registration after a delete starts anew).
    while session.scalar(select(Task.id).where(Task.id == task.id).with_for_update()) is None:
        session.expunge(task)
        task = get_or_create_task(session, tenant_id, task_name)
    number = (session.scalar(select(func.max(AdapterVersion.version)).where(AdapterVersion.task_id == task.id))
              or 0) + 1
    sha = blobs.put(session, weights)
    version = AdapterVersion(
        task_id=task.id, version=number, blob_sha256=sha, config=cfg, size_bytes=len(weights),
        metrics=cfg.get("metrics") or None, param_counts=cfg.get("param_counts"), method=cfg["method"],
        base_model=cfg["base_model"]["name"], base_fingerprint=cfg["base_model"]["fingerprint"], job_id=job_id,
    )
    session.add(version)
    session.flush()
    if activate:
        task.active_version_id = version.id
    return version


def versions(session: Session, task: Task) -> list[AdapterVersion]:
    return list(session.scalars(select(AdapterVersion).where(AdapterVersion.task_id == task.id)
                                .order_by(AdapterVersion.version)))


def get_version(session: Session, task: Task, number: int) -> AdapterVersion:
    v = session.scalar(select(AdapterVersion).where(AdapterVersion.task_id == task.id,
                                                    AdapterVersion.version == number))
    if v is None:
        raise NotFound(f"task {task.name!r} has no version {number}")
    return v


def active_version(session: Session, task: Task) -> AdapterVersion:
    if task.active_version_id is None:
        raise Conflict(f"task {task.name!r} has no active adapter version yet")
    v = session.get(AdapterVersion, task.active_version_id)
    if v is None:
        raise Conflict(f"task {task.name!r} has no active adapter version")
    return v


def activate(session: Session, tenant_id: uuid.UUID, name: str, number: int) -> AdapterVersion:
    task = get_task(session, tenant_id, name)
    # the task's row held to the commit: a delete meanwhile makes this a 404, not an update of a row now gone
    if session.scalar(select(Task.id).where(Task.id == task.id).with_for_update()) is None:
        raise NotFound(f"task {name!r} not found")
    version = get_version(session, task, number)
    task.active_version_id = version.id
    session.commit()
    return version


def delete_task(session: Session, tenant_id: uuid.UUID, name: str) -> list[uuid.UUID]:
    """Delete a task, its versions and their blobs (unless referenced elsewhere). Jobs stay, as history,
    without their adapter link. Returns the deleted version ids (for the engine to evict)."""
    task = get_task(session, tenant_id, name)
    vs = versions(session, task)
    ids = [v.id for v in vs]
    shas = {v.blob_sha256 for v in vs}
    task.active_version_id = None
    session.flush()
    for job in session.scalars(select(Job).where(Job.adapter_version_id.in_(ids))):
        job.adapter_version_id = None
    for v in vs:
        session.delete(v)
    session.delete(task)
    session.flush()
    for sha in shas:  # another tenant may be registering the same bytes right now: then the blob stays for it
        blobs.drop_if_unreferenced(session, sha)
    session.commit()
    return ids


def version_payload(session: Session, version_id: uuid.UUID) -> tuple[dict, bytes]:
    """(config, weights) of a version, the weights verified against their content address."""
    v = session.get(AdapterVersion, version_id)
    if v is None:
        raise NotFound(f"adapter version {version_id} not found")
    return v.config, blobs.get(session, v.blob_sha256)


# ----------------------------------------------------------------------------------------- reading


def list_page(session: Session, tenant_id: uuid.UUID, *, limit: int, cursor: str | None) -> tuple[list[Task], str | None]:
    return paginate(session, select(Task).where(Task.tenant_id == tenant_id), Task, limit=limit, cursor=cursor)


def versions_page(session: Session, task: Task, *, limit: int,
                  cursor: str | None) -> tuple[list[AdapterVersion], str | None]:
    return paginate(session, select(AdapterVersion).where(AdapterVersion.task_id == task.id), AdapterVersion,
                    limit=limit, cursor=cursor)


def active_versions(session: Session, tenant_id: uuid.UUID,
                    names: Sequence[str]) -> list[tuple[Task, AdapterVersion]]:
    """(task, active version) for each name, in order, in one query. `NotFound` for the first unknown task,
    `Conflict` for the first one without an active version."""
    rows = session.execute(
        select(Task, AdapterVersion)
        .outerjoin(AdapterVersion, AdapterVersion.id == Task.active_version_id)
        .where(Task.tenant_id == tenant_id, Task.name.in_(set(names)))
    ).all()
    found = {task.name: (task, version) for task, version in rows}
    for name in names:
        if name not in found:
            raise NotFound(f"task {name!r} not found")
    for name in names:
        if found[name][1] is None:
            raise Conflict(f"task {name!r} has no active adapter version yet")
    return [found[name] for name in names]


def served_base_models(session: Session) -> set[str]:
    """Base models of every registered version: the backbones this deployment already serves."""
    return set(session.scalars(select(AdapterVersion.base_model).distinct()))


def _dict(value: object) -> dict | None:
    return value if isinstance(value, dict) else None


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 2**63 - 1 else None


def version_out(version: AdapterVersion, *, active: bool) -> AdapterVersionOut:
    """The API view of a version. Defensive: a stored config that does not fit (written before the schema
    existed, or by hand) renders with the unusable parts left out, never as an error."""
    cfg = _dict(version.config) or {}
    task = _dict(cfg.get("task")) or {}
    counts = _dict(version.param_counts)
    metrics = _dict(version.metrics)
    if metrics is not None:
        metrics = {str(k): v for k, v in metrics.items()
                   if v is None or (isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v))}
    task_type = task.get("task_type")
    labels = task.get("labels")
    max_len = _int_or_none(cfg.get("max_seq_length"))
    values = dict(
        id=version.id, version=version.version, active=active, sha256=version.blob_sha256,
        size_bytes=version.size_bytes, base_model=version.base_model, base_fingerprint=version.base_fingerprint,
        method=_dict(version.method) or {},
        task_type=task_type if task_type in TASK_TYPES else "single_label_classification",
        labels=[str(x) for x in labels] if isinstance(labels, list) else [],
        trainable_params=_int_or_none((counts or {}).get("total")), param_counts=counts, metrics=metrics,
        max_seq_length=max_len if max_len and max_len <= DB_INT_MAX else None,
        stratification=_dict(cfg.get("stratification")), job_id=version.job_id, created_at=version.created_at)
    try:
        return AdapterVersionOut(**values)
    except ValidationError:  # anything else odd: the parts every version has, and nothing that can fail
        log.warning("adapter version %s has a config that does not render; showing its core fields", version.id)
        return AdapterVersionOut(**{**values, "method": {}, "labels": [], "param_counts": None, "metrics": None,
                                    "trainable_params": None, "max_seq_length": None, "stratification": None})


def tasks_out(session: Session, tasks: Sequence[Task]) -> list[TaskOut]:
    """Tasks with their active versions and version counts (two queries for any number of tasks)."""
    ids = [t.id for t in tasks]
    counts = dict(session.execute(select(AdapterVersion.task_id, func.count()).where(AdapterVersion.task_id.in_(ids))
                                  .group_by(AdapterVersion.task_id)).tuples().all()) if ids else {}
    active_ids = [t.active_version_id for t in tasks if t.active_version_id is not None]
    active = {v.id: v for v in session.scalars(select(AdapterVersion).where(AdapterVersion.id.in_(active_ids)))} \
        if active_ids else {}
    out = []
    for t in tasks:
        v = active.get(t.active_version_id) if t.active_version_id is not None else None
        out.append(TaskOut(name=t.name, version_count=counts.get(t.id, 0),
                           active_version=version_out(v, active=True) if v is not None else None,
                           created_at=t.created_at, updated_at=t.updated_at))
    return out


def task_out(session: Session, task: Task) -> TaskOut:
    return tasks_out(session, [task])[0]


def archive(session: Session, tenant_id: uuid.UUID, name: str, number: int | None = None) -> tuple[bytes, str, int]:
    """(zip, its sha256, version number) of a version, the active one by default: the same format
    `spafit_core.adapter.unpack` reads, so a download imports back as it is."""
    from spafit_core.adapter import pack

    task = get_task(session, tenant_id, name)
    version = get_version(session, task, number) if number is not None else active_version(session, task)
    cfg, weights = version_payload(session, version.id)
    data = pack(cfg, weights)
    return data, blobs.sha256_hex(data), version.version


# ----------------------------------------------------------------------------------------- PEFT
def peft_archive(archive_zip: bytes) -> bytes:
    """A version's zip (from `archive`) as a zipped PEFT LoRA folder for `peft.PeftModel.from_pretrained` on
    the stock classifier (see `spafit_core.peft_interop`). Loads the base model: bias deltas travel as
    whole biases, which need the base's."""
    from spafit_core.adapter import load_weights, model_from_adapter, unpack
    from spafit_core.peft_interop import pack_peft, to_peft

    cfg, weights = unpack(archive_zip)
    model = model_from_adapter(cfg, load_weights(cfg, weights), with_tokenizer=False)
    return pack_peft(to_peft(model))


def from_peft_archive(session: Session, archive_zip: bytes, *, base_model: str | None, labels: list[str] | None,
                      default_base_model: str, max_bytes: int) -> bytes:
    """A zipped PEFT LoRA folder as our adapter zip (`spafit_core.adapter.pack`), for the usual import. The
    base model (`base_model`, else the PEFT config's `base_model_name_or_path`) must be one this service
    serves, checked before anything is loaded: a client never makes the server fetch another model."""
    from spafit_core.adapter import pack
    from spafit_core.backbone import canonical_model_name
    from spafit_core.errors import AdapterMismatchError
    from spafit_core.peft_interop import from_peft, read_peft_files, serialize_imported, unpack_peft

    files = unpack_peft(archive_zip, max_bytes=max_bytes)
    name = base_model or read_peft_files(files)[0].get("base_model_name_or_path") or default_base_model
    allowed = {canonical_model_name(default_base_model), *served_base_models(session)}
    if not isinstance(name, str) or canonical_model_name(name) not in allowed:
        raise AdapterMismatchError(
            f"the PEFT adapter names base model {str(name)[:200]!r}, which this service does not serve; give "
            f"base_model= one of {sorted(allowed)}", field="base_model")
    session.rollback()  # the read is done: no pooled connection held while the base model loads
    model = from_peft(files, canonical_model_name(name), labels=labels)
    return pack(*serialize_imported(model))

