"""Postgres tells the API caches of every change to what they hold, whoever writes it: a statement trigger on
tasks, api_keys and tenants sends `NOTIFY spafit_cache` (app/services/cache.py), so an UPDATE through psql, a
repair script, `session.execute(text(...))` or a Core statement invalidates every replica like an ORM change.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_WATCHED = {"tasks": "active_version_id, name, tenant_id",
            "api_keys": "revoked_at, scopes, tenant_id, secret_hash, prefix",
            "tenants": "id"}


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return  # SQLite: every other connection's commit is seen through PRAGMA data_version
    op.execute("CREATE FUNCTION spafit_cache_notify() RETURNS trigger LANGUAGE plpgsql AS "
               "$$ BEGIN PERFORM pg_notify('spafit_cache', ''); RETURN NULL; END $$")
    for table, columns in _WATCHED.items():
        op.execute(f"CREATE TRIGGER spafit_cache_notify AFTER DELETE OR UPDATE OF {columns} ON {table} "
                   "FOR EACH STATEMENT EXECUTE FUNCTION spafit_cache_notify()")
        op.execute(f"CREATE TRIGGER spafit_cache_notify_truncate AFTER TRUNCATE ON {table} "
                   "FOR EACH STATEMENT EXECUTE FUNCTION spafit_cache_notify()")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in _WATCHED:
        op.execute(f"DROP TRIGGER IF EXISTS spafit_cache_notify ON {table}")
        op.execute(f"DROP TRIGGER IF EXISTS spafit_cache_notify_truncate ON {table}")
    op.execute("DROP FUNCTION IF EXISTS spafit_cache_notify()")
