"""`spafit --help` and every command's help: complete, fast, and without torch, the app or the SDK."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest

from app.cli import main
from tests.client.conftest import ROOT, subprocess_env

COMMANDS = {"serve", "worker", "db", "keys", "quickstart", "train", "predict", "datasets", "jobs", "tasks", "sweep",
            "export", "import", "batch", "evaluate", "usage"}


def walk(group: click.Group, prefix: tuple[str, ...] = ()):
    for name, command in group.commands.items():
        yield (*prefix, name)
        if isinstance(command, click.Group):
            yield from walk(command, (*prefix, name))


ALL = sorted(walk(main))


def test_help_lists_every_command(spafit):
    r = spafit("--help")
    assert r.exit_code == 0, r
    listed = {line.split()[0] for line in r.stdout.split("Commands:")[1].splitlines() if line.strip()}
    assert listed == COMMANDS
    assert "Exit codes" in r.stdout


def test_the_subcommands_are_all_there():
    assert {c for c in ALL if len(c) == 2} == {
        ("db", "upgrade"), ("db", "gc"), ("keys", "create"), ("keys", "list"), ("keys", "revoke"),
        ("datasets", "import"), ("datasets", "show"), ("datasets", "list"),
        ("jobs", "list"), ("jobs", "show"), ("jobs", "wait"), ("jobs", "cancel"), ("jobs", "delete"), ("jobs", "events"),
        ("tasks", "list"), ("tasks", "show"), ("tasks", "versions"), ("tasks", "activate"), ("tasks", "export"),
        ("tasks", "import"), ("batch", "create"), ("batch", "list"), ("batch", "show"), ("batch", "wait"),
        ("batch", "results"), ("batch", "cancel")}


@pytest.mark.parametrize("path", ALL, ids=" ".join)
def test_each_command_has_help(spafit, path):
    r = spafit(*path, "--help")
    assert r.exit_code == 0, r
    assert r.stdout.startswith("Usage: ") and " ".join(path) in r.stdout.splitlines()[0]
    command = main
    for name in path:
        command = command.commands[name]
    if not isinstance(command, click.Group) and path[0] not in ("serve", "worker"):
        assert "--json" in r.stdout  # every command but the long-running ones has script output


def test_help_imports_neither_torch_nor_the_app_nor_the_sdk():
    code = ("import sys; from click.testing import CliRunner; from app.cli import main; "
            "r = CliRunner().invoke(main, ['jobs', 'wait', '--help']); assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in ('torch', 'transformers', 'app.main', 'spafit_client', 'celery', 'sqlalchemy') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         env=subprocess_env())
    assert out.stdout.strip() == "[]"


def test_version(spafit):
    r = spafit("--version")
    assert r.exit_code == 0 and r.stdout.startswith("spafit, version ")


@pytest.mark.parametrize("args", [("nope",), ("predict",), ("jobs", "show"), ("tasks", "activate", "t", "zero"),
                                  ("train", "/no/such/file.csv")])
def test_usage_errors_exit_2(spafit, args):
    r = spafit(*args)
    assert r.exit_code == 2, r
