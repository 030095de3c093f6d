"""The core stays a library: no web, database or queue imports; and the parts the API imports to
validate input (config, errors, data, glue, metrics) do not even import torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("fastapi", "starlette", "sqlalchemy", "celery", "kombu", "redis", "alembic", "app", "worker")


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return set(out.stdout.split())


def test_core_imports_no_web_database_or_queue_library():
    mods = _modules_after("import spafit_core.engine, spafit_core.pipeline, spafit_core.batching, "
                          "spafit_core.adapter, spafit_core.train")
    leaked = sorted(m for m in mods if m.split(".")[0] in FORBIDDEN)
    assert leaked == []


def test_validation_modules_do_not_import_torch():
    mods = _modules_after("import spafit_core, spafit_core.config, spafit_core.errors, spafit_core.data, "
                          "spafit_core.glue, spafit_core.metrics")
    assert "torch" not in mods and "transformers" not in mods
