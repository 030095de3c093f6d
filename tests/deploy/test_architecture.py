"""ARCHITECTURE.md stays true to the tree: every file or folder it names exists, and the README points to it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "ARCHITECTURE.md"
# `app/services/jobs.py`, `spafit_core/engine` (a package or a module), `tests/deploy/...`: a relative path in code
PATH = re.compile(r"`([A-Za-z_][\w.-]*(?:/[\w.-]+)+/?)`")


def named_paths(text: str) -> list[str]:
    return sorted(set(PATH.findall(text)))


def test_every_path_architecture_names_exists():
    paths = named_paths(DOC.read_text(encoding="utf-8"))
    assert len(paths) >= 25, paths  # the pattern still finds the paths the page names
    missing = [p for p in paths if not (ROOT / p).exists() and not (ROOT / f"{p}.py").is_file()]
    assert missing == [], f"ARCHITECTURE.md names paths that do not exist: {missing}"


def test_the_path_pattern_reads_paths_and_nothing_else():
    text = "`app/routes/jobs.py` `spafit_core/engine` `POST /v1/jobs` `/v1/predict` `Lease.hold` `client/spafit_client/`"
    assert named_paths(text) == ["app/routes/jobs.py", "client/spafit_client/", "spafit_core/engine"]


def test_the_readme_links_the_architecture_page():
    assert "(ARCHITECTURE.md)" in (ROOT / "README.md").read_text(encoding="utf-8")
