"""Prometheus metrics. Each app owns a `Metrics` on its own CollectorRegistry (`app.state.metrics`), so
several apps in one process (tests) never clash. Parts that come later use the objects defined here:

    request.app.state.metrics.jobs_submitted.inc()
    metrics.predict_duration.labels(stage="forward").observe(seconds)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # HTTP (recorded by middleware.MetricsMiddleware); `route` is the template, e.g. /v1/datasets/{dataset_id}
        self.http_request_duration = Histogram(
            "spafit_http_request_duration_seconds", "HTTP request latency by route template and status.",
            ["method", "route", "status"], buckets=LATENCY_BUCKETS, registry=r)
        self.http_requests_in_flight = Gauge(
            "spafit_http_requests_in_flight", "HTTP requests being served.", registry=r)
        self.ready = Gauge("spafit_ready", "1 if the named readiness check passed on its last run.", ["check"],
                           registry=r)
        # Datasets
        self.datasets_created = Counter("spafit_datasets_created", "Datasets registered.", ["source"], registry=r)
        # Jobs (the jobs part increments these)
        self.jobs_submitted = Counter("spafit_jobs_submitted", "Fine-tuning jobs accepted.", registry=r)
        self.jobs_finished = Counter("spafit_jobs_finished", "Jobs that reached a final status.", ["status"],
                                     registry=r)
        self.jobs_by_status = Gauge("spafit_jobs", "Jobs per status (refreshed by the jobs part).", ["status"],
                                    registry=r)
        # Predict / engine (the predict part records these)
        self.predict_requests = Counter("spafit_predict_requests", "Predict requests by outcome.", ["outcome"],
                                        registry=r)
        self.predict_inputs = Histogram("spafit_predict_inputs", "Inputs per predict request.",
                                        buckets=BATCH_BUCKETS, registry=r)
        self.predict_duration = Histogram("spafit_predict_duration_seconds", "Predict time by stage "
                                          "(queue, tokenize, forward, total).", ["stage"], buckets=LATENCY_BUCKETS,
                                          registry=r)
        self.engine_batch_size = Histogram("spafit_engine_batch_size", "Inputs per batched forward pass.",
                                           buckets=BATCH_BUCKETS, registry=r)
        self.engine_queue_depth = Gauge("spafit_engine_queue_depth", "Requests waiting for the engine.", registry=r)
        self.adapters_loaded = Gauge("spafit_adapters_loaded", "Adapters resident in the engine's bank.",
                                     registry=r)
        self.adapter_loads = Counter("spafit_adapter_loads", "Adapter loads into the bank by outcome.", ["outcome"],
                                     registry=r)
        self.adapter_bytes = Gauge("spafit_adapter_bytes", "Bytes of the adapters resident in the engine's bank.",
                                   registry=r)
        self.backbones_loaded = Gauge("spafit_backbones_loaded", "Frozen backbones loaded by the engine.",
                                      registry=r)
        # Fair shares (per tenant; the queued and served series are read from the batcher at scrape time)
        self.predict_tenant_rejected = Counter(
            "spafit_predict_tenant_rejected", "Predict requests refused 429 because the tenant had its share of "
            "the queue waiting.", ["tenant"], registry=r)
        self.batcher_restarts = Counter("spafit_batcher_restarts", "Batcher threads found dead and restarted.",
                                        registry=r)
        # Live event streams and retention (app/services/streams.py, app/services/retention.py)
        self.event_streams_open = Gauge("spafit_event_streams_open", "Live job event streams open in this process.",
                                        registry=r)
        self.event_streams_refused = Counter(
            "spafit_event_streams_refused", "Event streams refused 429: the tenant had its cap open.", ["tenant"],
            registry=r)
        self.gc_freed = Counter("spafit_gc_freed", "What the collector freed (blobs, bytes, events, checkpoints, "
                                "trial_results).", ["what"], registry=r)

    def watch_engine(self, stats: Callable[[], dict[str, int]], queue_depth: Callable[[], int]) -> None:
        """Read the engine's state at scrape time: `stats()` gives the bank's counters (hits, misses,
        evictions, loads, adapters, adapter_bytes, backbones), `queue_depth()` the rows waiting."""
        self.engine_queue_depth.set_function(queue_depth)
        self.adapters_loaded.set_function(lambda: stats()["adapters"])
        self.adapter_bytes.set_function(lambda: stats()["adapter_bytes"])
        self.backbones_loaded.set_function(lambda: stats()["backbones"])
        self.registry.register(_EngineCacheCollector(stats))

    def serve(self, host: str, port: int) -> Callable[[], None]:
        """Serve the exposition on a listener of its own (`metrics_bind`: a daemon thread, no auth, meant for a
        private network); returns the function that stops it. OSError if the address is taken."""
        from prometheus_client import start_wsgi_server

        server, thread = start_wsgi_server(port, host, registry=self.registry)

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)

        return stop

    def watch_tenants(self, queued: Callable[[], dict[str, int]], served: Callable[[], dict[str, int]]) -> None:
        """`spafit_predict_tenant_queued_rows{tenant}` (rows waiting) and `spafit_predict_tenant_served_rows_total
        {tenant}` (rows run), read at scrape time."""
        self.registry.register(_TenantCollector(queued, served))

    def exposition(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text format."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EngineCacheCollector(Collector):
    """`spafit_engine_cache_total{event}`: the adapter bank's own counters (hit, miss, eviction, load)."""

    EVENTS = (("hit", "hits"), ("miss", "misses"), ("eviction", "evictions"), ("load", "loads"))

    def __init__(self, stats: Callable[[], dict[str, int]]):
        self.stats = stats

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield self._family()

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = self._family()
        stats = self.stats()
        for event, key in self.EVENTS:
            family.add_metric([event], stats.get(key, 0))
        yield family

    @staticmethod
    def _family() -> CounterMetricFamily:
        return CounterMetricFamily("spafit_engine_cache", "Adapter bank events since the engine started.",
                                   labels=["event"])


class _TenantCollector(Collector):
    """Per-tenant queue depth and rows served, as the batcher counts them."""

    def __init__(self, queued: Callable[[], dict[str, int]], served: Callable[[], dict[str, int]]):
        self.queued, self.served = queued, served

    def describe(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        yield from self._families()

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        queued, served = self._families()
        for tenant, rows in sorted(self.queued().items()):
            queued.add_metric([tenant], rows)
        for tenant, rows in sorted(self.served().items()):
            served.add_metric([tenant], rows)
        yield queued
        yield served

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, CounterMetricFamily]:
        return (GaugeMetricFamily("spafit_predict_tenant_queued_rows", "Prediction rows waiting, by tenant.",
                                  labels=["tenant"]),
                CounterMetricFamily("spafit_predict_tenant_served_rows", "Prediction rows run by the batcher since "
                                    "it started, by tenant.", labels=["tenant"]))
