"""Imports flow one way: `spafit_core` <- `app` <- `worker`, and the SDK (`client/spafit_client`) on its own.

Read from the source with `ast` (every import statement, those inside functions and `if TYPE_CHECKING:` too, as a
lazy import still couples the modules): the core never imports the service's packages or the web, database and
queue libraries; the app never imports the worker (it sends tasks by name, app/queues.py); the SDK imports
nothing of ours and no torch; and no two of our modules import each other, directly or round a longer circle
(an import under `if TYPE_CHECKING:` runs never, so it cannot close a circle; it still may not run the wrong way).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PACKAGES = {  # top-level package -> its folder
    "spafit_core": ROOT / "spafit_core",
    "app": ROOT / "app",
    "worker": ROOT / "worker",
    "migrations": ROOT / "migrations",
    "spafit_client": ROOT / "client" / "spafit_client",
}
FORBIDDEN = {  # what each package may not import (top-level names)
    "spafit_core": {"app", "worker", "migrations", "spafit_client", "fastapi", "starlette", "uvicorn", "sqlalchemy",
                    "alembic", "psycopg", "celery", "kombu", "redis", "pydantic_settings"},
    "app": {"worker"},
    "migrations": {"worker"},
    "spafit_client": {"spafit_core", "app", "worker", "migrations", "torch", "transformers"},
}


def modules(packages: Mapping[str, Path]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the packages (a package is its __init__.py)."""
    out: dict[str, Path] = {}
    for top, folder in packages.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [top, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imports(name: str, path: Path) -> Iterator[tuple[str, int, bool]]:
    """(imported module, line, type only) of every import statement in the file, wherever it stands; relative
    imports resolved, `from m import x` giving `m.x` (a submodule or a name of m: the caller tells which)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    type_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                 for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, id(node) in type_only
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            for alias in node.names:
                yield f"{base}.{alias.name}", node.lineno, id(node) in type_only


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def check(packages: Mapping[str, Path], forbidden: Mapping[str, set[str]]) -> list[str]:
    """Every import that runs the wrong way, and every circle of imports between our modules, in words."""
    mods = modules(packages)
    problems: list[str] = []
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        top = name.split(".")[0]
        for target, line, type_only in imports(name, path):
            # `from m import x`: x is a submodule of m, or a name defined in m
            module = target if target in mods else target.rpartition(".")[0] if "." in target else target
            if module.split(".")[0] in forbidden.get(top, ()):
                where = path.relative_to(packages[top].parent).as_posix()
                problem = f"{where}:{line}: {name} imports {module} ({top} may not import {module.split('.')[0]})"
                if problem not in problems:  # `from m import a, b`: one finding
                    problems.append(problem)
            while module and module not in mods:  # `import a.b.c` where a.b.c is a name: its module
                module = module.rpartition(".")[0]
            if module and module != name and not type_only:
                graph[name].add(module)
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return problems


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """One circle (a -> b -> ... -> a) through each strongly connected set of two or more modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(_circle(graph, component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _circle(graph: Mapping[str, set[str]], component: set[str]) -> list[str]:
    """A shortest path from the component's first module back to itself, inside the component."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    return [*paths[v], start]
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    return sorted(component)  # pragma: no cover - a strongly connected set always closes


# --------------------------------------------------------------------------------------------- the tests
def test_imports_flow_one_way_and_never_in_a_circle():
    assert check(PACKAGES, FORBIDDEN) == []


def test_every_package_is_read():
    mods = modules(PACKAGES)
    for expected in ("spafit_core.data", "spafit_core.glue", "app.services.jobs", "app.cli", "app.cli.running",
                     "app.queues", "worker.celery_app", "worker.tasks", "spafit_client"):
        assert expected in mods
    assert len(mods) > 80


def _write(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return {top: root / top for top in ("spafit_core", "app", "worker", "spafit_client")}


def test_the_check_finds_the_old_layouts_upward_imports_and_its_cycle(tmp_path):
    """The layout before issue 17, in miniature: the API and the CLI imported the worker's Celery app (inside
    functions), and data.py and glue.py imported each other (one of them lazily)."""
    packages = _write(tmp_path, {
        "spafit_core/__init__.py": "",
        "spafit_core/data.py": "def load_table(spec):\n    from .glue import load_glue\n    return load_glue(spec)\n",
        "spafit_core/glue.py": "from .data import NumberedLines, Table, load_hf_dataset, shorten\n",
        "app/__init__.py": "",
        "app/cli.py": "def worker():\n    from worker.celery_app import celery_app\n",
        "app/services/__init__.py": "",
        "app/services/jobs.py": "class Broker:\n    def __init__(self):\n"
                                "        from worker.celery_app import TRAINING_QUEUE, make_celery\n",
        "worker/__init__.py": "",
        "worker/celery_app.py": "from app.settings import get_settings\n",
        "spafit_client/__init__.py": "",
    })
    problems = check(packages, FORBIDDEN)
    assert any("app.cli imports worker.celery_app" in p for p in problems), problems
    assert any("app.services.jobs imports worker.celery_app" in p and "jobs.py:3" in p for p in problems), problems
    assert "import cycle: spafit_core.data -> spafit_core.glue -> spafit_core.data" in problems
    assert len(problems) == 3, problems


def test_the_check_finds_a_core_on_the_web_a_client_on_torch_and_a_longer_circle(tmp_path):
    """...and lets pass what runs the right way, and a circle that only the type checker sees."""
    packages = _write(tmp_path, {
        "spafit_core/__init__.py": "",
        "spafit_core/engine.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from sqlalchemy import Engine\n",
        "spafit_core/a.py": "from . import b\n",
        "spafit_core/b.py": "import spafit_core.c\n",
        "spafit_core/c.py": "def f():\n    from .a import x\n",
        "spafit_core/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .e import E\n",
        "spafit_core/e.py": "from .d import D\n",
        "app/__init__.py": "",
        "app/ok.py": "import spafit_core.a\nfrom spafit_client import Client\n",
        "worker/__init__.py": "",
        "worker/ok.py": "from app import ok\nfrom spafit_core import a\n",
        "spafit_client/__init__.py": "from ._client import Client\n",
        "spafit_client/_client.py": "import httpx\n\ndef tensor():\n    import torch\n",
    })
    problems = check(packages, FORBIDDEN)
    assert any("spafit_core.engine imports sqlalchemy" in p for p in problems), problems
    assert any("spafit_client._client imports torch" in p for p in problems), problems
    assert "import cycle: spafit_core.a -> spafit_core.b -> spafit_core.c -> spafit_core.a" in problems
    # the worker over the app and the core, the app over the SDK, a circle closed only for the type checker: fine
    assert len(problems) == 3, problems
