"""Prometheus metrics of a :class:`~policyserve.serving.server.PolicyServer` (``serve --metrics-port``).

:class:`MetricsExporter` is a door that serves no policy: it listens to the scheduler's and the other
doors' events and serves the metrics over HTTP (``/metrics``) with ``prometheus_client`` on its own
registry, from bind until the server has stopped. The protocols it labels are those of the server's
doors (:attr:`~policyserve.serving.doors.base.DoorContext.protocols`). Metric names and meanings are
listed in :data:`METRICS` (and in the README).

The HTTP server is a small asyncio one on its own thread (not a thread per connection): each connection
sends one ``GET`` within ``open_timeout`` s, gets the exposition (``Connection: close``) and is closed; at
most :data:`MAX_CONNECTIONS` are open (a new one drops the oldest). With the server's ``metrics_token`` a
scrape needs ``Authorization: Bearer <token>`` (Prometheus: ``authorization: {credentials: ...}``).
"""

from __future__ import annotations

import asyncio
import hmac
import socket
import threading
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..backend import replica_count
from ..events import SchedulerListener
from ..request import Request
from .base import DoorContext, FrontDoor, LimitedListener, PendingConnections, listening

__all__ = ["METRICS", "MetricsExporter", "replica_count"]

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MAX_CONNECTIONS = 64
"""Most open connections to the metrics port (or the server's ``max_connections``, if lower)."""
MAX_REQUEST_BYTES = 16 << 10
"""Longest request head (request line and headers) read."""

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
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._pending = PendingConnections(MAX_CONNECTIONS)
        self._token: bytes | None = None
        self._timeout = 10.0

    # -- FrontDoor -------------------------------------------------------------------------------
    def bind(self, context: DoorContext) -> int:
        self.host = self.host or context.host
        self.replicas.set_function(context.replicas)
        limits = context.connections
        self._pending = PendingConnections(min(MAX_CONNECTIONS, limits.max_connections))
        self._timeout = limits.open_timeout
        self._token = context.metrics_token.encode() if context.metrics_token is not None else None
        host = "" if self.host in ("0.0.0.0", "*") else self.host
        with listening(f"http://{self.host}:{self.requested_port}", self.host, self.requested_port):
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.create_server((host, self.requested_port), family=family, backlog=256)
        self._sock = LimitedListener.wrap(sock, self._pending)
        self.port = int(self._sock.getsockname()[1])
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(lambda loop, context: None)  # a scraper's broken connection is not news
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"policyserve-metrics-{self.port}",
                                        daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._open(), self._loop).result(10.0)
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
        loop, self._loop = self._loop, None
        if loop is not None and loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._close(), loop).result(max(timeout, 1.0) + 1.0)
            except Exception:  # noqa: BLE001 - closing regardless
                pass
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(max(timeout, 1.0))
        if loop is not None and not loop.is_running():
            loop.close()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # -- HTTP ------------------------------------------------------------------------------------
    async def _open(self) -> None:
        self._server = await asyncio.start_server(self._serve, sock=self._sock, limit=MAX_REQUEST_BYTES)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One request per connection: ``GET /metrics`` (or ``/``) -> the exposition; then close."""
        try:
            async with asyncio.timeout(self._timeout):
                head = await reader.readuntil(b"\r\n\r\n")
                status, body, extra = self._respond(head)
                writer.write(f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n{extra}"
                             "\r\n".encode("latin-1") + body)
                await writer.drain()
            writer.close()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, OSError):
            writer.transport.abort()  # silent, slow or gone: drop it, nothing buffered for it
        except asyncio.CancelledError:
            writer.transport.abort()
            raise

    def _respond(self, head: bytes) -> tuple[str, bytes, str]:
        lines = head.decode("latin-1").split("\r\n")
        method, _, rest = lines[0].partition(" ")
        path = rest.partition(" ")[0].partition("?")[0]
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", b"only GET\n", "Allow: GET\r\n"
        if path not in ("/metrics", "/"):
            return "404 Not Found", b"try /metrics\n", ""
        if self._token is not None:
            auth = next((line.partition(":")[2].strip() for line in lines[1:]
                         if line.partition(":")[0].strip().lower() == "authorization"), "")
            scheme, _, credentials = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(credentials.strip().encode(), self._token):
                return "401 Unauthorized", b"Unauthorized: a metrics token is required (Authorization: Bearer)\n", \
                    'WWW-Authenticate: Bearer realm="policyserve metrics"\r\n'
        body = generate_latest(self.registry)
        return "200 OK", b"" if method == "HEAD" else body, f"Content-Type: {CONTENT_TYPE_LATEST}\r\n"

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
