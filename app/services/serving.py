"""Serving: one `Serving` per API process (`app.state.serving`) owns the engine (one frozen backbone per base
model, adapters hot-swapped under their version id), the micro-batcher and their metrics.

Every request resolves its task's active version through an in-process cache (`cache.Invalidation`) that any
activation, deletion or key change empties in every replica (Postgres NOTIFY; SQLite's data version), so an
activation made through any API replica is served everywhere within a second, without a restart and without a
database round trip per request. The engine loads a version it does not
hold through `registry.version_payload` (the blob is verified on every read). torch is imported lazily, when
the engine is first needed: importing this module does not import it.

No request can hurt another's: each predict is admitted against its tenant's share of rows in flight, across
API replicas in server mode (`limits.TenantRows`, in Redis; in the process without it) (429
`tenant-queue-full` past it; 503 `overloaded` only when every tenant's rows together fill the queue), and
`PredictGate` refuses a tenant already over its share from its headers alone; the batcher serves tenants by
deficit round robin and retries a failing pass per adapter, then per row; its thread is supervised (restarted
by `batcher` and by the readiness check); a request whose client went away is cancelled and its rows dropped.
The admission gate (rows in flight by tenant, the share and the queue's bound, `PredictGate`) lives in
`admission.py`; `Serving` holds one and keeps its methods as the API the routes and the metrics call.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from spafit_core.errors import (
    AdapterMismatchError,
    OverloadedError,
    PredictionFailedError,
    RequestTimeoutError,
    SpafitError,
    TenantOverloadedError,
)

from ..db import Database
from ..errors import AppError, NotFound, ServiceUnavailable, TenantQueueFull
from ..metrics import Metrics
from ..models import AdapterVersion
from ..settings import Settings
from . import quota, registry
from .admission import (  # noqa: F401  (RETRY_AFTER_SECONDS, PredictGate: importable from here too)
    RETRY_AFTER_SECONDS,
    Admission,
    Overloaded,
    PredictGate,
)
from .cache import Invalidation

if TYPE_CHECKING:
    from spafit_core.batching import MicroBatcher
    from spafit_core.engine import Engine

log = logging.getLogger("spafit.serving")

FAN_OUT_ROWS = 64  # rows per forward pass of a fan-out (inputs x tasks), about a serving batch
Input = str | dict[str, str]  # a text, or {text, text_pair}


@dataclass(frozen=True)
class Served:
    """A task's active version, as the engine serves it."""

    task: str
    version: int
    adapter: str  # the engine's name for it: the version id
    base_model: str


class Serving:
    def __init__(self, settings: Settings, db: Database, metrics: Metrics):
        self.settings = settings
        self.db = db
        self.metrics = metrics
        self._lock = threading.Lock()  # engine and batcher creation, shutdown
        self._engine: Engine | None = None
        self._batcher: MicroBatcher | None = None
        self._stopped = False
        self._backbone_ready = threading.Event()
        self._preload_error: str | None = None
        # Rows in flight by tenant, checked against the tenant's share and the whole queue's bound (admission.py);
        # `tenant_rows`: the per-tenant share across API replicas (Redis, server mode); None: this process only.
        self.admission = Admission(settings, metrics)
        self.tenant_rows = self.admission.tenant_rows
        # Backbones being loaded for predicts, by base model: one load each, on threads of their own, awaited by
        # every request that needs it, so that waiting for a download holds none of the threads that predicts on
        # the backbones already loaded go through (the batcher's submitters, the event loop's executor).
        self._backbone_loads: dict[str, asyncio.Future] = {}
        self._backbone_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="spafit-backbone")
        # Active versions (and, in deps, API keys) read without the database; emptied on any change anywhere.
        self.cache = Invalidation(settings.database_url)
        metrics.watch_engine(self.stats, self.queue_depth)
        metrics.watch_tenants(self.tenant_depths, self.tenant_served)

    # ------------------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """With `preload_base_model`, load the default backbone in a background thread (readiness waits
        for it); otherwise the engine starts on the first request that needs it. The cache's listener starts."""
        self.cache.start()
        if self.tenant_rows is not None:
            self.tenant_rows.start()
        if self.settings.preload_base_model:
            threading.Thread(target=self._preload, name="spafit-preload", daemon=True).start()

    def _preload(self) -> None:
        name = self.settings.default_base_model
        start = time.perf_counter()
        try:
            self.engine.backbone(name)
        except Exception as e:  # reported by the readiness check
            if self._stopped:  # shut down before the engine started: nothing failed
                return
            self._preload_error = f"{type(e).__name__}: {e}"
            log.exception("loading the backbone %s failed", name)
            return
        # What exists now (torch, transformers, the backbone: ~480k objects) lives as long as the process. A full
        # collection walking it took ~0.23 s of CPU holding the GIL (the event loop and the batcher stall together,
        # longer on a busy machine); frozen, the collector skips it.
        gc.freeze()
        self._backbone_ready.set()
        log.info("backbone %s loaded in %.1fs", name, time.perf_counter() - start)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            batcher = self._batcher
        self.cache.stop()
        if self.tenant_rows is not None:
            self.tenant_rows.close()
        if batcher is not None:
            batcher.stop()
        self._backbone_pool.shutdown(wait=False, cancel_futures=True)

    def check_ready(self) -> None:
        """The readiness check "engine": once started, the batcher's thread is alive (a dead one fails this check
        once, and is restarted), whatever was preloaded; with `preload_base_model`, the default backbone is
        loaded. Before the first predict (no preload) there is nothing to check."""
        if self.restart_dead_batcher():
            raise RuntimeError("the batcher thread had died; it was restarted")
        if not self.settings.preload_base_model:
            return
        if self._preload_error is not None:
            raise RuntimeError(f"loading {self.settings.default_base_model} failed: {self._preload_error}")
        if not self._backbone_ready.is_set():
            raise RuntimeError(f"still loading the backbone {self.settings.default_base_model}")

    @property
    def engine(self) -> Engine:
        """The engine, created (and the batcher started) on first use. Blocking: call it from a thread."""
        self._ensure_started()
        assert self._engine is not None
        return self._engine

    @property
    def batcher(self) -> MicroBatcher:
        """The batcher, started on first use; supervised: a batcher whose thread died is restarted here."""
        self._ensure_started()
        assert self._batcher is not None
        self.restart_dead_batcher()
        return self._batcher

    def restart_dead_batcher(self) -> bool:
        """Start a new batcher thread if the running one died (its queue is kept); True if one was."""
        batcher = self._batcher
        if batcher is None or not batcher.ensure_running():
            return False
        self.metrics.batcher_restarts.inc()
        return True

    def _ensure_started(self) -> None:
        with self._lock:
            if self._stopped:
                raise ServiceUnavailable("the service is shutting down", headers={"Retry-After": "5"})
            if self._engine is not None:
                return
            from spafit_core.batching import BatchingConfig, MicroBatcher
            from spafit_core.engine import Engine

            s = self.settings
            engine = Engine(device=s.engine_device, device_bytes=s.engine_cache_bytes,
                            cpu_bytes=s.engine_cpu_cache_bytes, loader=self._load,
                            base_model_of=self._base_model_of, default_base_model=s.default_base_model,
                            max_backbones=s.engine_max_backbones, slot_kernel=s.engine_slot_kernel)
            config = BatchingConfig(max_batch_size=s.batch_max_size, max_wait_ms=s.batch_max_wait_ms,
                                    max_tokens=s.batch_max_tokens, max_queue=s.batch_max_queue,
                                    max_queue_per_tenant=s.batch_max_queue_per_tenant,
                                    quantum=s.batch_tenant_quantum, weights=dict(s.batch_tenant_weights),
                                    shared_batch_size=s.batch_shared_max_size or None,
                                    yield_to_light=s.batch_yield_to_light, timeout_s=s.predict_timeout_s)
            self._batcher = MicroBatcher(engine, config, on_batch=self._on_batch).start()
            self._engine = engine
            log.info("engine started on %s", engine.device)

    # ------------------------------------------------------------------------------ engine callbacks
    def _load(self, name: str) -> tuple[dict, bytes]:
        """The bank's loader on a miss: a version's config and verified weights from the registry."""
        try:
            with self.db.session() as session:
                payload = registry.version_payload(session, uuid.UUID(name))
        except Exception as e:
            self.metrics.adapter_loads.labels(outcome=getattr(e, "type", "error")).inc()
            raise
        self.metrics.adapter_loads.labels(outcome="ok").inc()
        return payload

    def _base_model_of(self, name: str) -> str:
        with self.db.session() as session:
            base = session.scalar(select(AdapterVersion.base_model).where(AdapterVersion.id == uuid.UUID(name)))
        if base is None:
            raise NotFound(f"adapter version {name} not found")
        return base

    def _on_batch(self, rows: int, tokens: int, seconds: float) -> None:
        self.metrics.engine_batch_size.observe(rows)
        self.metrics.predict_duration.labels(stage="forward").observe(seconds)

    def stats(self) -> dict[str, int]:
        engine = self._engine
        if engine is None:
            return {"hits": 0, "misses": 0, "evictions": 0, "loads": 0, "adapters": 0, "adapter_bytes": 0,
                    "backbones": 0}
        return {**engine.stats(), "backbones": len(engine.backbones)}

    def queue_depth(self) -> int:
        """Rows admitted and not answered yet, every tenant."""
        return self.admission.queue_depth()

    def tenant_depths(self) -> dict[str, int]:
        """Rows admitted and not answered yet, by tenant id."""
        return self.admission.tenant_depths()

    def tenant_served(self) -> dict[str, int]:
        """Rows served by the batcher since it started, by tenant id."""
        batcher = self._batcher
        return dict(batcher.served) if batcher is not None else {}

    # ----------------------------------------------------------------------------- the gate at entry
    def remember_key(self, headers: Mapping[str, str], tenant: str) -> None:
        """Note which tenant the request's (just authenticated) API key belongs to (`Admission.remember_key`)."""
        self.admission.remember_key(headers, tenant)

    def refuse_early(self, headers: Mapping[str, str]) -> tuple[str, int] | None:
        """(tenant, rows in flight) if `PredictGate` should answer 429 at once (`Admission.refuse_early`)."""
        return self.admission.refuse_early(headers)

    async def _admit(self, tenant: str, rows: int) -> Callable[[], None]:
        """Count `rows` of `tenant` in flight or refuse them (429 / 503); the release back (`Admission.admit`)."""
        return await self.admission.admit(tenant, rows)

    # ------------------------------------------------------------------------------------- predict
    def resolve(self, session: Session, tenant_id: uuid.UUID, tasks: Sequence[str]) -> list[Served]:
        """The active version of each task, from the registry (404 unknown, 409 none active)."""
        return [Served(task=t.name, version=v.version, adapter=str(v.id), base_model=v.base_model)
                for t, v in registry.active_versions(session, tenant_id, tasks)]

    async def predict(self, tenant_id: uuid.UUID, task: str, inputs: Sequence[Input],
                      top_k: int | None = None) -> dict[str, Any]:
        """One task over `inputs`, batched with whatever else is in flight (any tasks)."""
        tenant = str(tenant_id)
        with self._measure(len(inputs)):
            release = await self._admit(tenant, len(inputs))
            try:
                served = await self._resolve(tenant_id, [task])
                batcher = self._batcher  # started and alive: no thread needed to read it
                if batcher is None or not batcher.alive:
                    batcher = await asyncio.to_thread(lambda: self.batcher)
                await self._backbones_loaded(batcher.engine, served)
                predictions = await batcher.predict(served[0].adapter, inputs, top_k,
                                                    timeout_s=self.settings.predict_timeout_s, tenant=tenant)
            except TenantOverloadedError as e:  # the batcher's own bounds (only reached past ours)
                raise self._tenant_overloaded(tenant, e.message) from None
            except OverloadedError as e:
                raise self._overloaded(e.message) from None
            finally:
                release()  # a cancelled request's rows have left the batcher's queue too
            return {"task": task, "version": served[0].version, "predictions": predictions}

    async def fan_out(self, tenant_id: uuid.UUID, tasks: Sequence[str],
                      inputs: Sequence[Input], top_k: int | None = None) -> list[dict[str, Any]]:
        """Every input asked of every task: per input, the frozen prefix runs once and branches into one row
        per task (tasks on different base models branch per backbone). One result per task, in order."""
        tenant = str(tenant_id)
        with self._measure(len(inputs)):
            release = await self._admit(tenant, len(inputs) * len(tasks))  # fan-out rows bypass the batcher's queue
            try:
                served = await self._resolve(tenant_id, tasks)
                engine = self._engine if self._engine is not None else await asyncio.to_thread(lambda: self.engine)
                await self._backbones_loaded(engine, served)
                timeout = self.settings.predict_timeout_s
                stop = threading.Event()
                work = asyncio.get_running_loop().run_in_executor(
                    None, self._fan_out_sync, engine, served, inputs, top_k, time.monotonic() + timeout, stop)
            except BaseException:
                release()
                raise
            # The rows leave the count when the work ends, however it ends (even after a 504 or a disconnect).
            work.add_done_callback(lambda f: self._fan_out_done(f, release))
            try:
                done, _ = await asyncio.wait({work}, timeout=timeout)  # on timeout the work stops itself
            finally:
                if not work.done():  # timed out, or the client went away (this task cancelled)
                    stop.set()
            if not done:
                raise RequestTimeoutError(f"prediction did not finish within {timeout:.1f}s")
            return work.result()

    def _fan_out_sync(self, engine: Engine, served: list[Served], inputs: Sequence[Input], top_k: int | None,
                      deadline: float, stop: threading.Event) -> list[dict[str, Any]]:
        groups: dict[str, list[Served]] = {}
        for s in served:  # the shared prefix only exists within one backbone
            groups.setdefault(s.base_model, []).append(s)
        per_task: dict[str, list[dict]] = {s.adapter: [] for s in served}
        for group in groups.values():
            # the inputs of the request share forward passes: the prefix runs once per input, then one row per
            # (input, task); chunks of about FAN_OUT_ROWS rows keep the deadline checked between passes
            step = max(1, FAN_OUT_ROWS // len(group))
            for lo in range(0, len(inputs), step):
                if time.monotonic() > deadline or stop.is_set():  # the caller has gone: stop spending the engine
                    raise RequestTimeoutError("prediction timed out")
                chunk = inputs[lo: lo + step]
                start = time.perf_counter()
                try:
                    outs = engine.fan_out_many([s.adapter for s in group], chunk, top_k)
                except (SpafitError, AppError):  # keep their type: 404 (deleted since resolved), blob-corrupted
                    raise
                except Exception as e:  # the engine failed on these inputs: say so with a reference to the log
                    ref = uuid.uuid4().hex
                    log.error("fan-out failed (ref %s) over %s", ref, [s.task for s in group], exc_info=e)
                    where = f"input {lo}" if len(chunk) == 1 else f"input {lo} to {lo + len(chunk) - 1}"
                    raise PredictionFailedError(f"the prediction failed on {where} (ref {ref})",
                                                detail={"reference": ref}) from None
                self._on_batch(len(group) * len(chunk), 0, time.perf_counter() - start)
                for out in outs:
                    for s in group:
                        per_task[s.adapter].append(out[s.adapter])
        return [{"task": s.task, "version": s.version, "predictions": per_task[s.adapter]} for s in served]

    def _fan_out_done(self, work: asyncio.Future, release: Callable[[], None]) -> None:
        release()
        if not work.cancelled():
            work.exception()  # retrieved: an abandoned (timed out) call's error is not worth a log line

    async def _backbones_loaded(self, engine: Engine, served: Sequence[Served]) -> None:
        """Wait until the backbone of every served version is loaded, without holding a thread meanwhile: a base
        model not resident yet is loaded once, on `_backbone_pool`, whoever else waits for it (a request that goes
        away stops waiting; the load goes on for the next one). Its error, if it fails, is every waiter's."""
        resident = engine.backbones
        missing = {s.base_model for s in served} - set(resident)
        if not missing:
            return
        from spafit_core.backbone import canonical_model_name

        loop = asyncio.get_running_loop()
        for name in {canonical_model_name(b) for b in missing} - set(resident):
            load = self._backbone_loads.get(name)
            if load is None or load.get_loop() is not loop:
                load = self._backbone_loads[name] = loop.run_in_executor(self._backbone_pool, engine.backbone, name)
                load.add_done_callback(lambda f, name=name: self._backbone_loaded(name, f))
            await asyncio.shield(load)

    def _backbone_loaded(self, name: str, load: asyncio.Future) -> None:
        if self._backbone_loads.get(name) is load:
            del self._backbone_loads[name]  # loaded (the engine holds it now) or failed (the next request retries)
        if not load.cancelled():
            load.exception()  # retrieved: each waiter raised it already

    async def _resolve(self, tenant_id: uuid.UUID, tasks: Sequence[str]) -> list[Served]:
        """The active versions, from the cache when every task is there (no thread, no database), else from the
        registry in a thread (its own short session: no pooled connection is held while the engine works)."""
        hits = [self.cache.get(("task", tenant_id, t)) for t in tasks]
        if all(h is not None for h in hits):
            return hits  # type: ignore[return-value]
        generation = self.cache.generation  # read before the database: a change meanwhile drops what we read
        served = await asyncio.to_thread(self._resolve_sync, tenant_id, tasks)
        for s in served:
            self.cache.put(("task", tenant_id, s.task), s, generation)
        return served

    def _resolve_sync(self, tenant_id: uuid.UUID, tasks: Sequence[str]) -> list[Served]:
        with self.db.session() as session:
            return self.resolve(session, tenant_id, tasks)

    def _overloaded(self, message: str, depth: int | None = None) -> Overloaded:
        return self.admission.overloaded(message, depth)

    def _tenant_overloaded(self, tenant: str, message: str, depth: int | None = None) -> TenantQueueFull:
        return self.admission.tenant_overloaded(tenant, message, depth)

    def _measure(self, n_inputs: int) -> _Measure:
        return _Measure(self.metrics, n_inputs)

    def evict(self, version_ids: Sequence[uuid.UUID]) -> None:
        """Drop versions from the engine (a deleted task). Idempotent; a no-op before the engine starts."""
        engine = self._engine
        if engine is not None:
            for vid in version_ids:
                engine.evict(str(vid))

    # -------------------------------------------------------------------------------------- import
    def import_adapter(self, session: Session, tenant_id: uuid.UUID, task: str, archive: bytes, *,
                       max_stored_bytes: int = 0) -> AdapterVersion:
        """Register an adapter trained elsewhere (a zip from `spafit_core.adapter.pack`) as the task's next,
        active version, after the checks any version passes: the archive holds exactly the config and the
        safetensors weights (never a pickle), the weights match their sha256, the base model is one this
        service serves and its fingerprint matches, every tensor has the backbone's shape and is finite."""
        cfg, weights = self._unpack(archive)
        self._check_base_model(session, cfg["base_model"]["name"])
        self.verify(cfg, weights)
        quota.reserve(session, max_stored_bytes, tenant_id, len(weights), "this adapter")
        version = registry.register_version(session, tenant_id, task, cfg, weights, activate=True)
        session.commit()
        return version

    def verify(self, cfg: dict, weights: bytes) -> None:
        """Build the adapter against the real backbone (sha256, fingerprint, names and shapes, finiteness)
        without holding it: the engine loads it on its first predict like any other version. Values beyond
        `MAX_ABS_VALUE` are refused too: finite, yet every forward through them overflows to null scores."""
        from spafit_core.adapter import verify
        from spafit_core.engine import build_adapter

        backbone = self.engine.backbone(cfg["base_model"]["name"])
        build_adapter(backbone, "import", cfg, weights)
        verify(cfg, weights, fingerprint=backbone.fingerprint, expected_shapes=None)

    def _unpack(self, archive: bytes) -> tuple[dict, bytes]:
        from spafit_core.adapter import unpack

        return unpack(archive, max_bytes=2 * (self.settings.max_request_bytes or len(archive)))  # AdapterError

    def _check_base_model(self, session: Session, name: str) -> None:
        from spafit_core.backbone import canonical_model_name

        allowed = {canonical_model_name(self.settings.default_base_model), *registry.served_base_models(session)}
        if canonical_model_name(name) not in allowed:
            raise AdapterMismatchError(
                f"adapter was trained on base model {name!r}, which this service does not serve; it serves "
                f"{canonical_model_name(self.settings.default_base_model)!r} and the base models of adapters "
                "trained here", field="base_model.name")


class _Measure:
    """Counts a predict request by outcome and times it (stage "total")."""

    def __init__(self, metrics: Metrics, n_inputs: int):
        self.metrics = metrics
        self.n_inputs = n_inputs

    def __enter__(self) -> None:
        self.start = time.perf_counter()
        self.metrics.predict_inputs.observe(self.n_inputs)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            outcome = "ok"
        elif isinstance(exc, Overloaded):
            outcome = "overloaded"
        elif isinstance(exc, TenantQueueFull):
            outcome = "tenant-queue-full"
        elif isinstance(exc, RequestTimeoutError):
            outcome = "timeout"
        elif isinstance(exc, AppError | SpafitError) and exc.status < 500:
            outcome = "rejected"
        else:
            outcome = "error"
        self.metrics.predict_requests.labels(outcome=outcome).inc()
        self.metrics.predict_duration.labels(stage="total").observe(time.perf_counter() - self.start)
