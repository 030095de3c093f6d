"""Alembic migrations of the registry schema (`app.models`). Apply with `app.services.migrate.upgrade`."""
