"""The SDK tests use the live service of tests/live.py (a real `spafit serve` process, the session's real
worker). Names other test modules import from here are re-exported."""

from tests.live import (  # noqa: F401
    CLIENT_DIR,
    JOB_HYPERPARAMETERS,
    JOB_METHOD,
    ROOT,
    ApiProcess,
    Trained,
    free_port,
    subprocess_env,
)
