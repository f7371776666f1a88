"""Prometheus metrics of a :class:`~policyserve.serving.server.PolicyServer` (``serve --metrics-port``).

:class:`MetricsExporter` is a door that serves no policy: it listens to the scheduler's and the other
doors' events and serves the metrics over HTTP (``/metrics``) with ``prometheus_client`` on its own
registry, from bind until the server has stopped. The protocols it labels are those of the server's
doors (:attr:`~policyserve.serving.doors.base.DoorContext.protocols`). Metric names and meanings are
listed in :data:`METRICS` (and in the README).
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from ..backend import replica_count
from ..events import SchedulerListener
from ..request import Request
from .base import DoorContext, FrontDoor, listening

__all__ = ["METRICS", "MetricsExporter", "replica_count"]

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

METRICS = {
    "policyserve_requests_total": "requests by endpoint, protocol (gr00t, openpi) and outcome: ok, error "
                                  "(answered with an error), busy (refused over a limit), invalid (refused by the "
                                  "front door before queueing)",
    "policyserve_queue_seconds": "time from receipt to the start of the policy call that served the request",
    "policyserve_policy_seconds": "duration of the policy call that served the request (shared by merged requests)",
    "policyserve_request_seconds": "time from receipt to the reply",
    "policyserve_batch_size": "requests served by one policy call (merged batch size)",
    "policyserve_queue_depth": "requests waiting in the scheduler",
    "policyserve_busy_rejections_total": "requests refused as busy, by the limit reached and protocol",
    "policyserve_auth_failures_total": "requests (GR00T) or connections (openpi) refused for a wrong or missing token",
    "policyserve_replicas": "policy replicas serving (the backend's replicas attribute; 1 for an in-process policy)",
}


class MetricsExporter(SchedulerListener, FrontDoor):
    """Prometheus metrics on ``http://host:port/metrics`` (``host`` defaults to the server's; ``port=0``
    picks a free one, see :attr:`port`). The server reports its events to it (it is a listener)."""

    name = "metrics"

    def __init__(self, port: int = 9090, host: str | None = None,
                 registry: CollectorRegistry | None = None) -> None:
        self.requested_port, self.host = port, host
        self.port: int | None = None
        self.registry = registry or CollectorRegistry()
        r, by_request = self.registry, ["endpoint", "protocol"]
        self.requests = Counter("policyserve_requests", METRICS["policyserve_requests_total"],
                                [*by_request, "outcome"], registry=r)
        self.queue_seconds = Histogram("policyserve_queue_seconds", METRICS["policyserve_queue_seconds"], by_request,
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.policy_seconds = Histogram("policyserve_policy_seconds", METRICS["policyserve_policy_seconds"],
                                        by_request, buckets=LATENCY_BUCKETS, registry=r)
        self.request_seconds = Histogram("policyserve_request_seconds", METRICS["policyserve_request_seconds"],
                                         by_request, buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("policyserve_batch_size", METRICS["policyserve_batch_size"], ["endpoint"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth_gauge = Gauge("policyserve_queue_depth", METRICS["policyserve_queue_depth"], registry=r)
        self.busy = Counter("policyserve_busy_rejections", METRICS["policyserve_busy_rejections_total"],
                            ["limit", "protocol"], registry=r)
        self.auth_failures = Counter("policyserve_auth_failures", METRICS["policyserve_auth_failures_total"],
                                     ["protocol"], registry=r)
        self.replicas = Gauge("policyserve_replicas", METRICS["policyserve_replicas"], registry=r)
        self._http: Any = None
        self._thread: Any = None

    # -- FrontDoor -------------------------------------------------------------------------------
    def bind(self, context: DoorContext) -> int:
        self.host = self.host or context.host
        self.replicas.set_function(context.replicas)
        with listening(f"http://{self.host}:{self.requested_port}", self.host, self.requested_port):
            self._http, self._thread = start_http_server(self.requested_port, addr=self.host, registry=self.registry)
        self.port = int(self._http.server_port)
        for protocol in context.protocols:  # zeros from the start, so rates and alerts work before the first failure
            self.auth_failures.labels(protocol)
            for limit in ("max_queued_per_client", "max_queued_bytes"):
                self.busy.labels(limit, protocol)
        if context.verbose:
            print(f"Metrics: http://{self.host}:{self.port}/metrics", flush=True)
        return self.port

    def start(self) -> None:
        """Nothing to do: metrics are served from bind on."""

    def close(self, timeout: float) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._thread.join(timeout)
            self._http = None

    # -- SchedulerListener -----------------------------------------------------------------------
    def rejected(self, request: Request, limit: str) -> None:
        self.busy.labels(limit, request.protocol).inc()
        self.requests.labels(request.endpoint, request.protocol, "busy").inc()

    def queue_depth(self, queued: int) -> None:
        self.queue_depth_gauge.set(queued)

    def batch(self, endpoint: str, size: int, policy_ms: float) -> None:
        self.batch_size.labels(endpoint).observe(size)

    def answered(self, request: Request, ok: bool, policy_start: float | None, policy_end: float | None) -> None:
        labels = (request.endpoint, request.protocol)
        self.requests.labels(*labels, "ok" if ok else "error").inc()
        self.request_seconds.labels(*labels).observe(time.perf_counter() - request.received)
        if policy_start is not None and policy_end is not None:
            self.queue_seconds.labels(*labels).observe(max(0.0, policy_start - request.received))
            self.policy_seconds.labels(*labels).observe(policy_end - policy_start)

    def invalid(self, protocol: str, endpoint: str) -> None:
        self.requests.labels(endpoint, protocol, "invalid").inc()

    def unauthorized(self, protocol: str) -> None:
        self.auth_failures.labels(protocol).inc()
