"""End-to-end dashboard tests: the service as real processes (`spafit serve` in server mode on the session's
Postgres and Redis, plus the session's real Celery worker with the tiny backbone, from tests/worker) driven
by headless Chromium through Playwright. Screenshots go to test-artifacts/dashboard/.

Needs Chromium (`apt-get install -y chromium`, or SPAFIT_TEST_CHROMIUM=/path/to/chrome) and the `playwright`
Python package; Playwright's own browser download is not used.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.live import ROOT, ApiProcess

ARTIFACTS = ROOT / "test-artifacts" / "dashboard"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
# Errors a page may log that are not bugs: the auth probe's 401 (a request without a key) and, in some tests,
# the 403s, 404s and 422s the page shows in words.
EXPECTED_CONSOLE = ("status of 401", "status of 403", "status of 404", "status of 422")


# The API in server mode with the session's worker is tests/live.py's `live_server`, shared with the SDK and
# CLI tests.


@pytest.fixture(scope="session")
def embedded_server(tmp_path_factory, tiny_base: str) -> Iterator[ApiProcess]:
    """A second API in embedded mode (auth off, SQLite, no worker): what `spafit serve` gives a local user."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPAFIT_") or k.startswith("SPAFIT_TEST_")}
    env.update({"SPAFIT_DATA_DIR": str(tmp_path_factory.mktemp("embedded-data")), "SPAFIT_DEFAULT_BASE_MODEL": tiny_base,
                "PYTHONPATH": str(ROOT)})
    server = ApiProcess(env, tmp_path_factory.mktemp("embedded-server") / "serve.log").launch()
    try:
        server.wait_ready(path="/healthz")
    except BaseException:
        server.stop()
        raise
    yield server
    server.stop()


# --------------------------------------------------------------------------------------------- browser


def chromium_path() -> str:
    path = os.environ.get("SPAFIT_TEST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("Chromium is not installed: `apt-get install -y chromium` (or set SPAFIT_TEST_CHROMIUM)",
                    pytrace=False)
    return path


@pytest.fixture(scope="package")
def browser() -> Iterator[Any]:
    # Package scope, not session: playwright's sync API keeps an asyncio loop running on the main
    # thread while it is open, and every later `asyncio.run` in the suite would then fail.
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser tests need the `playwright` package (pip install playwright; no browser "
                    "download: they drive the system Chromium)", pytrace=False)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS)
        yield b
        b.close()


@pytest.fixture
def new_page(browser: Any) -> Iterator[Callable[[], Any]]:
    """`new_page()`: a page in a fresh browser context (its own sessionStorage: another user). Uncaught page
    errors fail the test, as do console errors other than the HTTP statuses the page shows in words."""
    contexts, problems = [], []

    def make() -> Any:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        context.set_default_timeout(20_000)
        contexts.append(context)
        pg = context.new_page()
        pg.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        pg.on("console", lambda m: m.type == "error" and not any(s in m.text for s in EXPECTED_CONSOLE)
              and problems.append(f"console error: {m.text}"))
        return pg

    yield make
    for context in contexts:
        context.close()
    assert not problems, problems


@pytest.fixture
def page(new_page: Callable[[], Any]) -> Any:
    return new_page()


@pytest.fixture
def shot() -> Callable[[Any, str], Path]:
    """`shot(page, "jobs")` saves a full-page screenshot to test-artifacts/dashboard/jobs.png."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    def save(pg: Any, name: str) -> Path:
        path = ARTIFACTS / f"{name}.png"
        pg.screenshot(path=str(path), full_page=True)
        return path

    return save


class Api:
    """The live server's HTTP API with one tenant's key: arranging jobs the page then shows. `close()`
    cancels the jobs it started that are still going, so that none holds the worker for the next test."""

    def __init__(self, url: str, key: str):
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        self.jobs: list[str] = []

    def close(self) -> None:
        for job_id in self.jobs:
            if self.http.get(f"/v1/jobs/{job_id}").json()["status"] in ("queued", "running"):
                self.http.post(f"/v1/jobs/{job_id}/cancel")
        self.http.close()

    def upload(self, content: bytes, name: str, **fields: str) -> str:
        r = self.http.post("/v1/datasets", files={"file": (name, content)}, data=fields)
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def job(self, body: dict) -> dict:
        r = self.http.post("/v1/jobs", json=body)
        assert r.status_code == 202, r.text
        self.jobs.append(r.json()["id"])
        return r.json()

    def wait(self, job_id: str, pred: Callable[[dict], bool], timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            job = self.http.get(f"/v1/jobs/{job_id}").json()
            if pred(job):
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; last state: {job}")
            time.sleep(0.2)


@pytest.fixture
def api(live_server: Any) -> Iterator[Callable[[str], Api]]:
    clients: list[Api] = []

    def make(key: str) -> Api:
        clients.append(Api(live_server.url, key))
        return clients[-1]

    yield make
    for c in clients:
        c.close()
