"""`spafit serve` (the HTTP API, and in embedded mode a worker beside it) and `spafit worker` (a Celery worker)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import click

from .common import exit_on_signal, main


@main.command()
@click.option("--queues", default="training,light", show_default=True, help="Celery queues to consume.")
@click.option("--concurrency", default=1, show_default=True, type=int,
              help="Training processes; use one per GPU.")
@click.option("--loglevel", default="INFO", show_default=True)
def worker(queues: str, concurrency: int, loglevel: str) -> None:
    """Run a Celery worker. Each training job runs in a fresh child process (CUDA is never initialised in
    a parent that forks), one job per process at a time."""
    from celery.bin.celery import celery

    from app.queues import WORKER_APP
    from app.settings import get_settings

    get_settings()  # SPAFIT_* misconfigured: one line naming it (exit 2), not Celery's traceback of the app's import

    # `celery -A worker.celery_app:celery_app worker ...` in this process (what `Celery.worker_main` runs): the
    # worker's app named, not imported, so the app package never imports the worker (app/queues.py).
    try:
        celery.main(args=[
            "-A", WORKER_APP, "worker", "--queues", queues, "--concurrency", str(concurrency), "--pool", "prefork",
            "--max-tasks-per-child", "1", "--prefetch-multiplier", "1", "--loglevel", loglevel,
            # spafit@<host>: what the compose health check pings (`celery inspect ping -d spafit@$HOSTNAME`).
            "--without-gossip", "--without-mingle", "--hostname", os.environ.get("SPAFIT_WORKER_NAME", "spafit@%h"),
        ], standalone_mode=False)
    except click.exceptions.Exit:  # as `worker_main` does: the worker's own exit code is not passed on
        pass


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--worker/--no-worker", "with_worker", default=None,
              help="Also run a worker process (default: yes in embedded mode, no in server mode).")
@click.option("--workers", "api_workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="API processes (uvicorn).")
@click.option("--insecure-bind", is_flag=True,
              help="With auth off (embedded mode), bind a non-loopback --host anyway: everyone who reaches the "
              "port acts as the local tenant. Also SPAFIT_INSECURE_BIND=true.")
def serve(host: str, port: int, with_worker: bool | None, api_workers: int, insecure_bind: bool) -> None:
    """Run the HTTP API. In embedded mode (no settings at all) it also starts a worker, so one command
    gives a working service on SQLite and a local broker. With auth off it binds only loopback addresses
    unless told otherwise (--insecure-bind)."""
    import uvicorn

    from app.main import _configure_logging, log
    from app.security import is_loopback
    from app.settings import LOOPBACK_HOSTS, get_settings

    settings = get_settings()
    _configure_logging(settings.log_level)
    if not settings.auth_enabled and not is_loopback(host):
        if not (insecure_bind or settings.insecure_bind):
            raise click.UsageError(
                f"auth is off (embedded mode), so --host {host} would let anyone who reaches port {port} act as "
                "the local tenant. Bind 127.0.0.1, run server mode (SPAFIT_MODE=server: API keys), or pass "
                "--insecure-bind to accept that.")
        log.warning(
            "INSECURE BIND: auth is off and the API listens on %s:%s; anyone who reaches it acts as the local "
            "tenant (--insecure-bind)", host, port)
        os.environ["SPAFIT_INSECURE_BIND"] = "true"  # for the app, which refuses network requests otherwise
        get_settings.cache_clear()
    if not is_loopback(host) and sorted(settings.allowed_hosts) == sorted(LOOPBACK_HOSTS):
        log.warning("only the loopback Host names are answered (SPAFIT_ALLOWED_HOSTS); add the name clients use")
    if with_worker is None:
        with_worker = settings.mode == "embedded"
    child = None
    # Migrate once, before the API processes and the worker start, never concurrently in each (several API processes
    # migrating one fresh SQLite file failed to start).
    if settings.auto_migrate:
        from app.services import migrate

        migrate.upgrade(settings.database_url)
    if with_worker:
        child = subprocess.Popen([sys.executable, "-m", "app.cli", "worker", "--loglevel", "WARNING"])
        click.echo(f"started worker process {child.pid}", err=True)
        # uvicorn re-raises the SIGTERM it shut down on once it is done; with the default action that would
        # end this process before `finally` could stop the worker, leaving it orphaned.
        signal.signal(signal.SIGTERM, exit_on_signal)
    try:
        uvicorn.run("app.main:create_app", factory=True, host=host, port=port, workers=api_workers,
                    log_level="info")
    finally:
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
