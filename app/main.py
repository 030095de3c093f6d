"""The FastAPI application: `create_app()` wires settings, database, metrics, readiness checks, middleware,
error handlers and routers. Run it with `uvicorn app.main:create_app --factory`."""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from starlette.concurrency import run_in_threadpool

from spafit_core import __version__

from .db import Database
from .errors import PROBLEM_MEDIA_TYPE, install_error_handlers
from .fast_path import FastPredict
from .metrics import Metrics
from .middleware import BodyLimitMiddleware, HostOriginMiddleware, MetricsMiddleware, RequestIdMiddleware
from .routes import api_keys, batch, dashboard, datasets, health, jobs, predict, tasks, usage, webhooks
from .services import datasets as dataset_service
from .services import jobs as job_service
from .services import keys, migrate
from .services import webhooks as webhook_service
from .services.conversions import Conversions
from .services.health import Readiness, ping_broker
from .services.serving import PredictGate, Serving
from .services.streams import EventHub, StreamSlots, end_streams_on_shutdown
from .settings import Settings, get_settings

log = logging.getLogger("spafit")

AUTH_OFF_BANNER = """
****************************************************************************************
*  AUTH IS OFF: embedded/local mode (SPAFIT_MODE=embedded). Every request acts as the  *
*  built-in 'local' tenant with all scopes. Do not expose this port beyond localhost.  *
*  For a shared deployment set SPAFIT_MODE=server (auth on, Postgres, Redis).          *
****************************************************************************************"""


def _configure_logging(level: str) -> None:
    log.setLevel(level.upper())
    if not log.handlers and not logging.getLogger().handlers:  # uvicorn only configures its own loggers
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)


def _database_check(db: Database) -> None:
    db.ping()
    migrate.check_current(db.engine)


def _startup(settings: Settings, db: Database) -> None:
    if settings.auto_migrate:
        migrate.upgrade(settings.database_url)
    if not settings.auth_enabled:
        log.warning(AUTH_OFF_BANNER)
        with db.session() as session:
            keys.ensure_local_tenant(session)
    log.info("spafit %s ready: mode=%s database=%s", __version__, settings.mode, db.engine.url.render_as_string())


def _serve_metrics(settings: Settings, metrics: Metrics) -> Any:
    """Start the separate metrics listener (`metrics_bind`), if any; its stop function, or None. With several
    API processes only the first binds the address; the others log it and go on (their series are not served)."""
    if settings.metrics_listener is None:
        return None
    host, port = settings.metrics_listener
    try:
        stop = metrics.serve(host, port)
    except OSError as e:
        log.warning("metrics listener %s not started: %s", settings.metrics_bind, e)
        return None
    log.info("metrics served on http://%s/metrics (not on the API port)", settings.metrics_bind)
    return stop


async def _requeue_loop(app: FastAPI) -> None:
    """Every `job_requeue_interval_s`: re-send orphaned jobs (see services.jobs.requeue_orphans) and refresh
    the jobs-by-status gauge. Harmless with several API replicas: claims are atomic."""
    settings: Settings = app.state.settings
    while True:
        await asyncio.sleep(settings.job_requeue_interval_s)
        try:
            await run_in_threadpool(job_service.requeue_orphans, app.state.db, app.state.send_job, settings)
            await run_in_threadpool(dataset_service.requeue_imports, app.state.db, app.state.send_import, settings)
            await run_in_threadpool(webhook_service.requeue_due, app.state.db, app.state.send_webhook, settings)
            counts = await run_in_threadpool(job_service.count_by_status, app.state.db)
            for status, n in counts.items():
                app.state.metrics.jobs_by_status.labels(status=status).set(n)
        except Exception:  # the database may be away; try again next round
            log.warning("job requeue round failed", exc_info=True)


async def _gc_loop(app: FastAPI) -> None:
    """Every `gc_interval_s`: the collector (services.retention.collect: finished jobs' checkpoints, blobs nothing
    references, old events). Scheduled here like the requeuer, so it runs in embedded mode too, where no Celery
    beat runs; several replicas may run it at once (every step re-checks what it deletes)."""
    from .services import retention

    while True:
        await asyncio.sleep(app.state.settings.gc_interval_s)
        try:
            report = await run_in_threadpool(retention.collect, app.state.db, app.state.settings)
            report.record(app.state.metrics)
        except Exception:  # the database may be away; try again next round
            log.warning("gc round failed", exc_info=True)


def _problem_openapi(app: FastAPI) -> dict[str, Any]:
    """OpenAPI with every 4xx/5xx response filed under application/problem+json."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            for code, response in operation.get("responses", {}).items():
                content = response.get("content", {})
                if code[:1] in "45" and "application/json" in content:
                    content[PROBLEM_MEDIA_TYPE] = content.pop("application/json")
    app.openapi_schema = schema
    return schema


def _resolve_transformers() -> None:
    """Resolve the names request threads import from transformers lazily, once, before any request runs:
    transformers' lazy module is not safe to import from several threads at once (a fresh process's first
    concurrent job creates and adapter imports failed with ImportError, a 500)."""
    from spafit_core.adapter_schema import TRANSFORMERS_IMPORT_LOCK

    with TRANSFORMERS_IMPORT_LOCK:
        from transformers import AutoConfig, AutoTokenizer  # noqa: F401  (no torch: the engine imports it when used)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    _configure_logging(settings.log_level)
    # Python picks its temporary directory on first use by writing and deleting a scratch file there: done now,
    # not when the first large upload spills to disk (a process killed mid-upload left that file behind).
    tempfile.gettempdir()
    _resolve_transformers()
    db = Database.from_settings(settings)
    metrics = Metrics()
    readiness = Readiness(timeout=settings.readiness_timeout)
    readiness.add("database", partial(_database_check, db))
    readiness.add("broker", partial(ping_broker, settings.broker_url, key_prefix=settings.broker_key_prefix,
                                    timeout=settings.readiness_timeout))
    serving = Serving(settings, db, metrics)
    # A dead batcher thread fails it (and is restarted); with preload, so does a backbone not loaded yet (without,
    # the backbone loads on the first predict, unwaited for).
    readiness.add("engine", serving.check_ready)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(_startup, settings, db)
        serving.start()
        stop_metrics = _serve_metrics(settings, metrics)
        requeue = asyncio.create_task(_requeue_loop(app))
        gc = asyncio.create_task(_gc_loop(app))
        restore_signals = end_streams_on_shutdown(app.state.event_hub)  # SIGTERM ends live streams at once
        yield
        requeue.cancel()
        gc.cancel()
        restore_signals()
        app.state.stream_slots.close()
        if stop_metrics is not None:
            stop_metrics()
        await run_in_threadpool(serving.stop)
        db.dispose()

    app = FastAPI(title="SPAFIT", version=__version__, lifespan=lifespan,
                  description="Fine-tune SPAFIT adapters and serve every task from one frozen backbone. "
                  "Errors are application/problem+json (RFC 9457) with a stable `type`.")
    app.state.settings = settings
    app.state.db = db
    app.state.metrics = metrics
    app.state.readiness = readiness
    app.state.serving = serving
    app.state.send_job = job_service.Broker(settings)
    app.state.event_hub = EventHub(db, settings.sse_poll_interval_s)  # live event streams (routes/jobs.py)
    app.state.stream_slots = StreamSlots.from_settings(settings)
    app.state.conversions = Conversions.from_settings(settings)  # PEFT exports and imports (load a base model)
    app.state.uploads = dataset_service.upload_slots(settings)  # reading and checking uploaded files
    app.state.send_import = app.state.send_job.send_import  # dataset imports run in the worker too
    app.state.send_webhook = webhook_service.broker_sender(settings)
    webhook_service.install_outbox(db, app.state.send_webhook)  # deliveries go out when their job's end commits

    if settings.predict_fast_path:  # added first: the innermost, past every gate below (app/fast_path.py)
        app.add_middleware(FastPredict, settings=settings, serving=serving, exception_handlers=app.exception_handlers)
    install_error_handlers(app)
    # add_middleware puts each new one outside the previous: the last added runs first.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["Authorization", "X-API-Key", "Content-Type", "Idempotency-Key",
                                          "X-Request-ID"],
                           expose_headers=["X-Request-ID", "Retry-After"])
    # Outside CORS and the body cap: a foreign Host or a forged cross-origin request is refused unread.
    app.add_middleware(HostOriginMiddleware, allowed_hosts=settings.allowed_hosts,
                       allowed_origins=settings.cors_origins,
                       loopback_only=not settings.auth_enabled and not settings.insecure_bind)
    # A tenant with its whole share of the prediction queue in flight gets 429 from its headers alone.
    app.add_middleware(PredictGate, serving=serving)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(RequestIdMiddleware)

    app.include_router(health.router)
    app.include_router(datasets.router)
    app.include_router(jobs.router)
    app.include_router(batch.router)
    app.include_router(batch.evaluate_router)
    app.include_router(tasks.router)
    app.include_router(webhooks.router)
    app.include_router(api_keys.router)
    app.include_router(usage.router)
    app.include_router(predict.router)
    app.include_router(dashboard.router)
    app.mount(dashboard.ASSETS_PATH, dashboard.assets(), name="dashboard-assets")
    app.openapi = partial(_problem_openapi, app)  # type: ignore[method-assign]
    return app
