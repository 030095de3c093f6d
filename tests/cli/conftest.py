"""The CLI tests run `spafit` in-process (click's runner: real exit codes, stdout and stderr apart) and, where
the process itself matters, as `python -m app.cli`. Remote commands talk to the live service of
tests/live.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest


class Result:
    def __init__(self, result: Any):
        self.exit_code: int = result.exit_code
        self.stdout: str = result.stdout
        self.stderr: str = result.stderr
        self.exception = result.exception

    def json(self) -> Any:
        return json.loads(self.stdout)

    def error(self) -> dict[str, Any]:
        return json.loads(self.stderr.strip().splitlines()[-1])["error"]

    def __repr__(self) -> str:
        return f"exit {self.exit_code}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


@pytest.fixture
def spafit(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Result]:
    """`spafit(*args, url=..., key=...)` runs the CLI in-process with SPAFIT_URL / SPAFIT_API_KEY set."""
    from click.testing import CliRunner

    from app.cli import main

    for name in ("SPAFIT_URL", "SPAFIT_API_KEY"):
        monkeypatch.delenv(name, raising=False)

    def run(*args: str, url: str | None = None, key: str | None = None, input: str | None = None) -> Result:
        env = {k: v for k, v in (("SPAFIT_URL", url), ("SPAFIT_API_KEY", key)) if v is not None}
        return Result(CliRunner().invoke(main, list(args), env=env, input=input))

    return run
