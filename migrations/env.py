"""Alembic environment. The URL comes from `app.services.migrate` (config.attributes["url"]) or, when run
as `alembic ...` from the shell, from the service settings (SPAFIT_DATABASE_URL)."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import JSON, Connection, text

from app.db import make_engine
from app.models import Base, UTCDateTime
from app.settings import get_settings

config = context.config
if config.config_file_name is not None and not config.attributes.get("url"):
    # Only for the shell CLI; never reconfigure the logging of a running service.
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata
MIGRATION_LOCK = 0x5AF17  # Postgres advisory lock: replicas that start together migrate one at a time


def _url() -> str:
    return config.attributes.get("url") or get_settings().database_url


def _render_item(type_: str, obj: object, autogen_context) -> str | bool:
    """Render our portable column types as plain SQLAlchemy types, so revisions never import app code."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    if type_ == "type" and isinstance(obj, JSON) and "postgresql" in getattr(obj, "_variant_mapping", {}):
        autogen_context.imports.add("from sqlalchemy.dialects import postgresql")
        return 'sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")'
    return False


def _configure(**kw) -> None:
    context.configure(target_metadata=target_metadata, compare_type=True, render_item=_render_item, **kw)


def run_migrations_offline() -> None:
    url = _url()
    _configure(url=url, literal_binds=True, dialect_opts={"paramstyle": "named"},
               render_as_batch=url.startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    sqlite = connection.dialect.name == "sqlite"
    if sqlite:
        # Batch mode rebuilds a table (copy, DROP TABLE, rename); with foreign keys on (app/db.py turns them on for
        # every connection) the DROP deletes the rows that refer to it (job events, webhook deliveries, a version's
        # job link) or fails. Off while migrating (a no-op inside a transaction: set first), checked after.
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        connection.commit()  # end the transaction SQLAlchemy began for it: alembic's own below commits the migration
    # transactional_ddl: SQLite has it, but Alembic assumes not and commits after each revision (which would let go
    # of the lock below between revisions).
    _configure(connection=connection, render_as_batch=sqlite, **({"transactional_ddl": True} if sqlite else {}))
    try:
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                connection.execute(text(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"))
            elif sqlite:
                # The write lock before the revision is read, and every DDL inside one transaction (Python's sqlite3
                # opens none for DDL by itself): two processes migrating one file at once took turns reading the
                # revision and then both ran the same ALTERs ("duplicate column name"), and a failed migration was
                # left half applied.
                connection.exec_driver_sql("BEGIN IMMEDIATE")
            context.run_migrations()
            if sqlite:  # checked before the commit: a migration that would leave such rows is rolled back whole
                dangling = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
                if dangling:
                    from app.services.migrate import SchemaNotCurrent

                    raise SchemaNotCurrent(f"the migration would leave rows whose foreign keys point nowhere "
                                           f"({dangling[:5]}); nothing was changed")
    finally:
        if sqlite:
            connection.exec_driver_sql("PRAGMA foreign_keys=ON")
            connection.commit()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(_url())
    try:
        with engine.connect() as connection:
            _run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
