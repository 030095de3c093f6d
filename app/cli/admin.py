"""Administering a service from its own machine: `spafit db ...` (migrations, garbage collection) and
`spafit keys ...` (API keys). These talk to the database directly, not over HTTP."""

from __future__ import annotations

import click

from .common import EXIT_NOT_FOUND, SpafitGroup, emit, fail, json_option, main


@main.group(cls=SpafitGroup)
def db() -> None:
    """Database schema (Alembic)."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@json_option
def db_upgrade(revision: str, as_json: bool) -> None:
    """Apply migrations up to REVISION (run once per deploy, before the API starts)."""
    from app.services import migrate
    from app.settings import get_settings

    url = get_settings().database_url
    migrate.upgrade(url, revision)
    current = migrate.current(url)
    emit({"revision": current}, as_json, f"database at {current}")


@db.command("gc")
@json_option
def db_gc(as_json: bool) -> None:
    """Free what nothing needs: checkpoints of finished jobs, blobs no row references (older than
    SPAFIT_GC_BLOB_GRACE_S), events of jobs finished over SPAFIT_EVENT_RETENTION_DAYS ago. The API also runs
    this every SPAFIT_GC_INTERVAL_S; running it by hand at the same time is safe."""
    from app.services import retention
    from app.settings import get_settings

    database = _db()
    try:
        report = retention.collect(database, get_settings())
    finally:
        database.dispose()
    emit(report.to_dict(), as_json, f"gc: {report}")


@main.group(cls=SpafitGroup)
def keys() -> None:
    """API keys (stored hashed; the plaintext is shown once, at creation)."""


def _db():
    from app.db import Database
    from app.services import migrate
    from app.settings import get_settings

    database = Database.from_settings(get_settings())
    migrate.check_current(database.engine)  # not migrated (or behind): say so, not the SQL the first query fails
    return database


@keys.command("create")
@click.option("--tenant", required=True, help="Tenant name (created if new).")
@click.option("--name", default="default", show_default=True, help="A label for the key.")
@click.option("--scope", "scopes", multiple=True, type=click.Choice(["admin", "train", "predict"]),
              default=("train", "predict"), show_default=True)
@json_option
def keys_create(tenant: str, name: str, scopes: tuple[str, ...], as_json: bool) -> None:
    """Create a key for TENANT and print it (once)."""
    from app.errors import NotFound
    from app.services import keys as key_service

    key_service.check_name(name, "key")  # before a new tenant is committed: no keyless tenant left behind
    with _db().session() as s:
        try:
            t = key_service.get_tenant(s, tenant)
        except NotFound:
            t = key_service.create_tenant(s, tenant)
        row, plaintext = key_service.create_key(s, t.id, name, list(scopes))
        out = {"key": plaintext, "id": str(row.id), "tenant": tenant, "tenant_id": str(t.id),
               "scopes": list(row.scopes), "prefix": row.prefix}
    emit(out, as_json, f"{plaintext}\n(tenant {tenant}, scopes {', '.join(out['scopes'])}; store it now: "
                        "it is not shown again)")


@keys.command("list")
@click.option("--tenant", required=True)
@json_option
def keys_list(tenant: str, as_json: bool) -> None:
    """List a tenant's keys (prefixes only)."""
    from app.errors import NotFound
    from app.services import keys as key_service

    with _db().session() as s:
        try:
            t = key_service.get_tenant(s, tenant)
        except NotFound as e:
            fail(e.message, EXIT_NOT_FOUND)
        rows = [{"id": str(k.id), "name": k.name, "prefix": k.prefix, "scopes": list(k.scopes),
                 "created_at": k.created_at.isoformat(),
                 "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None}
                for k in key_service.list_keys(s, t.id)]
    emit(rows, as_json, "\n".join(f"{r['prefix']}  {r['name']:<16} {','.join(r['scopes']):<20} "
                                   f"{'revoked' if r['revoked_at'] else 'active'}" for r in rows) or "no keys")


@keys.command("revoke")
@click.argument("key_id_or_prefix")
@click.option("--tenant", required=True)
@json_option
def keys_revoke(key_id_or_prefix: str, tenant: str, as_json: bool) -> None:
    """Revoke a tenant's key by id or prefix; it stops working at once."""
    from app.errors import NotFound
    from app.services import keys as key_service

    with _db().session() as s:
        try:
            row = key_service.revoke_key(s, key_service.get_tenant(s, tenant).id, key_id_or_prefix)
        except NotFound as e:
            fail(e.message, EXIT_NOT_FOUND)
    emit({"id": str(row.id), "revoked": True}, as_json, f"revoked {row.prefix}")
