"""Apply the Alembic migrations programmatically (the CLI's `db upgrade`, the embedded server's startup)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, OperationalError

import migrations

from ..db import make_engine


def alembic_config(url: str) -> Config:
    """An Alembic config for `url` that works from any working directory and from an installed package."""
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    cfg.attributes["url"] = url  # not a main option: URL-encoded passwords contain '%'
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    at = current(url)
    if not known(at):  # Alembic said only "Can't locate revision identified by '0099'"
        raise SchemaNotCurrent(_ahead(at))
    try:
        command.upgrade(alembic_config(url), revision)
    except DBAPIError as e:  # a statement failed (the data, a hand-made change): one line, not a traceback
        if e.orig is None or (isinstance(e, OperationalError) and not url.startswith("sqlite")):
            raise  # the database went away: said as unreachable (SQLite says "already exists" with one too)
        why = " ".join(f"{type(e.orig).__name__}: {e.orig}".split())
        raise SchemaNotCurrent(f"migrating from revision {at or 'none'} failed ({why}); the database is at "
                               f"revision {current(url) or 'none'}") from e


def known(revision: str | None) -> bool:
    """Whether this code has `revision` (None, a database never migrated, counts as known)."""
    if revision is None:
        return True
    try:
        return ScriptDirectory.from_config(alembic_config("")).get_revision(revision) is not None
    except Exception:  # alembic.util.CommandError / ResolutionError: not one of ours
        return False


def _ahead(at: str | None) -> str:
    return (f"database schema is at revision {at}, which this code does not know (its newest is {head()}): "
            "a newer release migrated it; run that release")


def downgrade(url: str, revision: str = "-1") -> None:
    """Step back to `revision` ("-1": one revision, "base": drop everything)."""
    command.downgrade(alembic_config(url), revision)


@lru_cache
def head() -> str | None:
    """The newest revision this code knows."""
    return ScriptDirectory.from_config(alembic_config("")).get_current_head()


def current(url: str) -> str | None:
    """The revision the database is at (None: never migrated)."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def is_current(url: str) -> bool:
    return current(url) == head()


class SchemaNotCurrent(RuntimeError):
    """The database is not at this code's revision (not migrated yet, or behind, or ahead)."""


def check_current(engine: Engine) -> None:
    """Raise unless the database behind `engine` is migrated to this code's head (a real query)."""
    with engine.connect() as conn:
        at = MigrationContext.configure(conn).get_current_revision()
    expected = head()
    if at != expected and not known(at):
        raise SchemaNotCurrent(_ahead(at))
    if at != expected:
        raise SchemaNotCurrent(f"database schema is at revision {at or 'none'}, this code needs {expected}; "
                           "run `spafit db upgrade`")
