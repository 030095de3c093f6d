"""Dataset imports in the worker: `spafit.import_dataset(dataset_id)` reads a Hugging Face dataset, bounded in
rows, bytes and time, and makes the dataset `ready` or `failed` (app.services.datasets.run_import)."""

from __future__ import annotations

import logging
import uuid

from app.db import Database
from app.services import datasets
from app.settings import Settings

log = logging.getLogger("spafit.worker")


def import_dataset(db: Database, dataset_id: str, settings: Settings) -> str:
    try:
        parsed = uuid.UUID(dataset_id)
    except ValueError:
        log.warning("ignoring an import message with a malformed dataset id %r", dataset_id)
        return "final"
    outcome = datasets.run_import(db, parsed, settings)
    log.info("dataset import %s: %s", dataset_id, outcome)
    return outcome
