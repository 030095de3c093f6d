"""The README stays true: its configuration table is the settings class, its two commands are the ones
CI and the Makefile run."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_config_table_matches_settings():
    import importlib.util

    spec = importlib.util.spec_from_file_location("config_table", ROOT / "scripts/config_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index(mod.BEGIN) + len(mod.BEGIN): readme.index(mod.END)].strip()
    assert section == mod.table(), "run: python scripts/config_table.py --write"


def test_readme_holds_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^make (\w+)", readme, re.M)
    assert commands[:2] == ["quickstart", "test"]
    ci = (ROOT / ".ci/run").read_text()
    assert re.search(r"^make .*\btest$", ci, re.M)
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^quickstart: install", makefile, re.M)
    # `test` sets up the venv too: through test-setup, which installs it beside Chromium
    assert re.search(r"^test: test-setup", makefile, re.M)
    assert re.search(r"^test-setup:\n\t.*\binstall\b", makefile, re.M)
    assert 'TORCH ?= torch==2.13.0' in makefile
