"""The API process must not pay for torch unless it serves predictions (style guide: no torch at module
level in app/)."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_app_does_not_import_torch():
    code = "import sys, app.main, app.routes.datasets; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_app_modules_never_import_torch_themselves():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "app"
    offenders = [str(p) for p in root.rglob("*.py")
                 if any(line.startswith(("import torch", "from torch")) for line in p.read_text().splitlines())]
    assert offenders == []
