"""`spafit`: one command-line entry point for running, administering and using the service.

Run it: `serve`, `worker`; administer it: `db upgrade`, `keys`; try it: `quickstart`; train without a
service: `train`; use a service (through the SDK, `spafit_client`): `predict`, `jobs`, `tasks`, `usage`. Remote
commands take `--url` ($SPAFIT_URL, default http://127.0.0.1:8000) and `--api-key` ($SPAFIT_API_KEY).
Every command but `serve` and `worker` takes `--json`: the result as JSON on stdout, and an error as
`{"error": {...}}` on stderr.

Exit codes scripts can rely on: 0 success, 1 the operation failed (e.g. a job failed), 2 usage error,
3 not found, 4 auth/permission error, 5 service unreachable, 6 validation error (4xx from the API),
7 timed out, 130 interrupted.

Heavy modules (torch, the app, the SDK) are imported inside the commands that use them, so `--help`
is instant and needs no torch.

One module per command group: running.py (serve, worker), quickstart.py, local.py (train, export, import),
predict.py, datasets.py, jobs.py, sweep.py, tasks.py, usage.py, admin.py (db, keys); app/cli_batch.py (batch, evaluate).
common.py holds what they share: the `main` group, exit codes, `--json` and the `remote` decorator.
"""

from __future__ import annotations

from ..cli_batch import register as _register_batch
from . import admin, datasets, jobs, local, predict, quickstart, running, sweep, tasks, usage  # noqa: F401  (their commands)
from .common import SpafitGroup, emit, exit_code_for, job_text, main, remote

__all__ = ["exit_code_for", "main"]

_register_batch(main, remote=remote, emit=emit, job_text=job_text, group_cls=SpafitGroup)  # `spafit batch`, `evaluate`
