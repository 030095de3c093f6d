"""The Alembic migrations create exactly the models' schema, and go down and up again cleanly."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from app.db import make_engine
from app.models import Base
from app.services import migrate

TABLES = {"tenants", "api_keys", "blobs", "datasets", "jobs", "job_events", "tasks", "adapter_versions",
          "alembic_version", "webhook_deliveries", "batch_chunks", "version_evaluations"}


def _diff(url: str) -> list:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_there_is_one_head():
    from alembic.script import ScriptDirectory

    assert len(ScriptDirectory.from_config(migrate.alembic_config("")).get_heads()) == 1


def test_upgrade_downgrade_upgrade_on_a_fresh_postgres(empty_pg_url):
    migrate.upgrade(empty_pg_url)
    assert _tables(empty_pg_url) == TABLES and migrate.is_current(empty_pg_url)
    migrate.downgrade(empty_pg_url, "base")
    assert _tables(empty_pg_url) == {"alembic_version"} and migrate.current(empty_pg_url) is None
    migrate.upgrade(empty_pg_url)
    assert _tables(empty_pg_url) == TABLES and migrate.current(empty_pg_url) == migrate.head()


def test_models_match_the_migrated_postgres_schema(empty_pg_url):
    migrate.upgrade(empty_pg_url)
    assert _diff(empty_pg_url) == []


@pytest.mark.parametrize("cycle", [False, True])
def test_models_match_the_migrated_sqlite_schema(tmp_path, cycle):
    url = f"sqlite:///{tmp_path / 'spafit.db'}"
    migrate.upgrade(url)
    if cycle:
        migrate.downgrade(url, "base")
        migrate.upgrade(url)
    assert _diff(url) == []


def test_a_model_change_without_a_migration_is_detected(empty_pg_url):
    from sqlalchemy import Column, MetaData, String, Table

    migrate.upgrade(empty_pg_url)
    extra = MetaData()
    for table in Base.metadata.tables.values():
        table.to_metadata(extra)
    Table("tenants", extra, Column("plan", String(20)), extend_existing=True)
    engine = make_engine(empty_pg_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), extra)
    finally:
        engine.dispose()
    assert [d[0] for d in diff] == ["add_column"]
