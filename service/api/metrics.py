"""Prometheus metrics: one registry per application, and an ASGI middleware for requests.

Exposed at ``GET /metrics``: requests by route and status, latency histograms, objects
measured, exposure cache hits/misses and bytes, job queue depth, measurements in
flight and (CuPy backend) device memory in use.
"""

from __future__ import annotations

from collections.abc import Callable
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: the HTTP methods that may become label values; any other token a client sends is "other"
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER = "other"
UNMATCHED = "unmatched"


class ServiceMetrics:
    """The service's metrics in their own registry (so several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("forcedphot_http_requests", "HTTP requests answered", ["method", "route", "status"], registry=r)
        self.latency = Histogram("forcedphot_http_request_duration_seconds", "HTTP request latency", ["method", "route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.objects = Counter("forcedphot_objects_measured", "DiaObjects measured on a detector", registry=r)
        self.abandoned = Counter("forcedphot_requests_abandoned", "measurements stopped because the client went away", registry=r)
        self.measure_seconds = Histogram("forcedphot_measure_duration_seconds", "engine time per measurement, by stage",
                                         ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.cache = Counter("forcedphot_exposure_cache_requests", "exposure cache look-ups by outcome", ["outcome"], registry=r)
        self.cache_bytes = Gauge("forcedphot_exposure_cache_bytes", "bytes of pixels held by the exposure cache", registry=r)
        self.in_flight = Gauge("forcedphot_measurements_in_flight", "measurement requests being served", registry=r)
        self.queue_depth = Gauge("forcedphot_job_queue_depth", "jobs queued or running", registry=r)
        self.jobs = Counter("forcedphot_jobs_finished", "jobs finished by final state", ["state"], registry=r)
        self.kernel_calls = Gauge("forcedphot_batcher_kernel_calls", "kernel calls made by the dynamic batcher", registry=r)
        self.batched_requests = Gauge("forcedphot_batcher_requests", "measurement batches served by the dynamic batcher", registry=r)
        self.device_memory = Gauge("forcedphot_device_memory_bytes", "GPU memory held by the CuPy memory pool", registry=r)

    def watch(self, gauge: Gauge, read: Callable[[], float]) -> None:
        """Make ``gauge`` read its value from ``read()`` at every scrape."""
        gauge.set_function(read)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its media type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def device_memory_reader(backend_name: str) -> Callable[[], float] | None:
    """A function giving the CuPy pool's bytes in use, or None off the GPU."""
    if backend_name != "cupy":
        return None
    import cupy

    pool = cupy.get_default_memory_pool()
    return lambda: float(pool.used_bytes())


def method_label(method: str) -> str:
    """``method`` if it is a known HTTP method, else "other" (a client chooses the token:
    taking it as a label value would let any client grow the registry without bound)."""
    return method if method in KNOWN_METHODS else OTHER


class MetricsMiddleware:
    """Counts every HTTP request and times it, labelled by route template and known method
    (bounded labels: a path or method the application does not define is one value each)."""

    def __init__(self, app, metrics: ServiceMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = getattr(scope.get("route"), "path", UNMATCHED)
            method = method_label(scope.get("method", ""))
            self.metrics.requests.labels(method, route, str(status["code"])).inc()
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - start)
