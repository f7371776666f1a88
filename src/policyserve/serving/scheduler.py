"""One scheduler between the front doors (GR00T ZeroMQ, openpi websocket) and a policy backend.

Front doors hand it :class:`Request` objects with a reply callback; it queues them per client, within
limits, and worker threads serve them:

- **fair**: clients take turns (round-robin by identity); a client's own requests stay in order, and
  at most one batch per client is in flight, so replies never overtake each other;
- **continuous batching**: while a policy call runs, requests queue; when it returns, every queued
  ``get_action`` that can share a call (equal options, same observation layout) goes into the next
  one, up to ``max_batch_size`` requests. Clients the previous merged call answered are given up to
  ``rejoin_wait_ms`` (at most half that call's time) to send their next request, so closed-loop clients
  stay together instead of splitting into small batches; a lone client pays no batching delay
  (``batch_window_ms`` adds an optional wait for more);
- **bounded**: per-client and total-bytes limits; a request over a limit is refused at once with
  :class:`ServerBusyError`, never left waiting;
- **clean shutdown**: :meth:`close` answers everything queued with "server shutting down" and waits
  for the calls in progress to be answered.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import PolicyServeError
from ..policies.base import merge_key
from ..policies.batching import layout_key
from .backend import Backend
from .events import NULL_LISTENER, SchedulerListener

SHUTTING_DOWN = "server shutting down"


class ServerBusyError(PolicyServeError):
    """A request was refused because a queue limit was reached (the message names the limit)."""


@dataclass
class SchedulerConfig:
    """Limits and batching of a :class:`Scheduler`."""

    max_batch_size: int = 32
    """Most requests merged into one policy call; 1 turns merging off."""
    batch_window_ms: float = 0.0
    """Extra wait for more requests before a call that is not full (0: continuous batching only)."""
    rejoin_wait_ms: float = 5.0
    """Longest wait for the clients of the previous merged call to send again (0: never wait)."""
    max_queued_per_client: int = 64
    """Requests one client may have waiting; more are refused as busy."""
    max_queued_bytes: int = 1 << 30
    """Total size of the waiting requests' messages; more are refused as busy."""
    workers: int = 1
    """Policy calls in flight at once (one per backend replica)."""


@dataclass
class Request:
    """One call from a client, as a front door hands it over."""

    client: str
    endpoint: str
    data: dict[str, Any]
    reply: Callable[[Any], None]
    """Called once, from a worker thread, with the reply payload (``[action, info]``, a reset result
    or ``{"error": ...}``)."""
    nbytes: int = 0
    protocol: str = "gr00t"
    received: float = field(default_factory=time.perf_counter)
    call: Callable[[], Any] | None = None
    """For endpoints other than get_action/reset: what to run on the worker."""


class Scheduler:
    """Queues requests per client and serves them on worker threads through ``backend``."""

    def __init__(self, backend: Backend, config: SchedulerConfig | None = None,
                 listener: SchedulerListener | None = None) -> None:
        self.backend = backend
        self.config = config or SchedulerConfig()
        if self.config.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.config.max_batch_size}")
        self.listener = listener or NULL_LISTENER
        self._lock = threading.Condition()
        self._queues: dict[str, deque[Request]] = {}
        self._turns: deque[str] = deque()  # clients with queued work, in serving order
        self._busy_clients: set[str] = set()
        self._queued_bytes = 0
        self._queued = 0
        self._in_flight = 0
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._rejoining: set[str] = set()  # clients of the last merged call that have not sent again
        self._last_call_ms = 0.0

    # -- front-door side -------------------------------------------------------------------------
    def start(self) -> None:
        for i in range(max(1, self.config.workers)):
            thread = threading.Thread(target=self._work, name=f"policyserve-worker-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def submit(self, request: Request) -> None:
        """Queue ``request``; raises :class:`ServerBusyError` (or a shutting-down error) at once if refused."""
        cfg = self.config
        with self._lock:
            if self._closed:
                raise ServerBusyError(SHUTTING_DOWN)
            queue = self._queues.get(request.client)
            if queue is not None and len(queue) >= cfg.max_queued_per_client:
                self.listener.rejected(request, "max_queued_per_client")
                raise ServerBusyError(
                    f"server busy: this client already has {len(queue)} requests queued "
                    f"(max_queued_per_client={cfg.max_queued_per_client}); wait for replies before sending more")
            if self._queued_bytes + request.nbytes > cfg.max_queued_bytes and self._queued:
                self.listener.rejected(request, "max_queued_bytes")
                raise ServerBusyError(
                    f"server busy: {self._queued_bytes} bytes of requests queued, this one has {request.nbytes} "
                    f"(max_queued_bytes={cfg.max_queued_bytes}); retry shortly")
            if queue is None:
                queue = self._queues[request.client] = deque()
            if not queue and request.client not in self._busy_clients:
                self._turns.append(request.client)
            queue.append(request)
            self._queued += 1
            self._queued_bytes += request.nbytes
            self.listener.queue_depth(self._queued)
            self._lock.notify()

    @property
    def queued(self) -> int:
        with self._lock:
            return self._queued

    def close(self, timeout: float | None = None) -> bool:
        """Refuse new requests, answer queued ones with "server shutting down" and wait for the calls
        in progress; True when everything was answered within ``timeout``."""
        with self._lock:
            self._closed = True
            dropped = [r for q in self._queues.values() for r in q]
            self._queues.clear()
            self._turns.clear()
            self._queued = self._queued_bytes = 0
            self.listener.queue_depth(0)
            self._lock.notify_all()
        for request in dropped:
            self._answer(request, {"error": SHUTTING_DOWN})
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    # -- worker side -----------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._serve(batch)
            finally:
                with self._lock:
                    self._in_flight -= 1
                    for client in dict.fromkeys(r.client for r in batch):
                        self._busy_clients.discard(client)
                        if self._queues.get(client):
                            self._turns.append(client)
                    self._lock.notify_all()

    def _next_batch(self) -> list[Request] | None:
        with self._lock:
            while not self._turns:
                if self._closed:
                    return None
                self._lock.wait()
            first_client = self._turns.popleft()
            first = self._take(first_client)
            batch = [first]
            if first.endpoint == "get_action" and self._mergeable():
                self._wait_for_rejoin(first)
                if self.config.batch_window_ms > 0:
                    self._wait_for_more(first)
                batch += self._companions(first)
            self._busy_clients.update(r.client for r in batch)
            if first.endpoint == "get_action":
                self._rejoining = {r.client for r in batch} if len(batch) > 1 else set()
            self._in_flight += 1
            self.listener.queue_depth(self._queued)
            return batch

    def _mergeable(self) -> bool:
        return self.config.max_batch_size > 1 and self.backend.batchable

    def _take(self, client: str) -> Request:
        queue = self._queues[client]
        request = queue.popleft()
        if not queue:
            del self._queues[client]
        self._queued -= 1
        self._queued_bytes -= request.nbytes
        return request

    def _wait_for_rejoin(self, first: Request) -> None:
        """Wait (bounded) until every client of the previous merged call but ``first``'s has a request queued."""
        wait_ms = min(self.config.rejoin_wait_ms, self._last_call_ms / 2)
        deadline = time.perf_counter() + wait_ms / 1000
        while not self._closed and any(c != first.client and c not in self._queues and c not in self._busy_clients
                                       for c in self._rejoining):
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._lock.wait(remaining)

    def _wait_for_more(self, first: Request) -> None:
        deadline = first.received + self.config.batch_window_ms / 1000
        while self._queued < self.config.max_batch_size - 1 and not self._closed:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._lock.wait(remaining)

    def _companions(self, first: Request) -> list[Request]:
        """Queued get_action requests that can share ``first``'s call, taken in turn order, a client's
        requests only from the head of its queue (order per client is kept)."""
        key = self._key(first)
        taken: list[Request] = []
        room = self.config.max_batch_size - 1
        # ``first``'s client may contribute more requests, then every client in turn, repeatedly.
        order = [first.client, *self._turns]
        progress = True
        while room > 0 and progress:
            progress = False
            for client in order:
                queue = self._queues.get(client)
                if not queue or room == 0 or queue[0].endpoint != "get_action" or self._key(queue[0]) != key:
                    continue
                taken.append(self._take(client))
                room -= 1
                progress = True
        busy = {first.client, *(r.client for r in taken)}
        self._turns = deque(c for c in self._turns if c not in busy)
        return taken

    def _key(self, request: Request) -> Any:
        return (layout_key(request.data.get("observation")),
                merge_key(request.data.get("options"), self.backend.row_options))

    def _serve(self, batch: list[Request]) -> None:
        start = time.perf_counter()
        first = batch[0]
        if first.endpoint == "get_action":
            outcomes = _run(lambda: self.backend.get_action(batch))
            if isinstance(outcomes, BaseException):
                outcomes = [outcomes] * len(batch)
        elif first.endpoint == "reset":
            outcomes = [_run(lambda: self.backend.reset(first.data.get("options"), first.client))]
        else:
            assert first.call is not None
            outcomes = [_run(first.call)]
        end = time.perf_counter()
        if first.endpoint == "get_action":
            self._last_call_ms = (end - start) * 1000
        self.listener.batch(first.endpoint, len(batch), (end - start) * 1000)
        for request, outcome in zip(batch, outcomes):
            if isinstance(outcome, BaseException):
                self.listener.failed(request, outcome)
                payload: Any = {"error": error_message(outcome)}
            elif request.endpoint == "get_action":
                action, info = outcome
                info = dict(info)
                info["server_timing"] = {
                    **info.get("server_timing", {}),
                    "queue_ms": (start - request.received) * 1000,
                    "policy_ms": (end - start) * 1000,
                    "merged_requests": len(batch),
                }
                payload = [action, info]
            else:
                payload = outcome
            self._answer(request, payload, start, end)

    def _answer(self, request: Request, payload: Any, start: float | None = None, end: float | None = None) -> None:
        if isinstance(payload, list) and len(payload) == 2 and isinstance(payload[1], dict) \
                and "server_timing" in payload[1]:
            payload[1]["server_timing"]["recv_to_reply_ms"] = (time.perf_counter() - request.received) * 1000
        ok = not (isinstance(payload, dict) and "error" in payload and len(payload) == 1)
        try:
            request.reply(payload)
        finally:
            self.listener.answered(request, ok, start, end)


def _run(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except Exception as exc:  # noqa: BLE001 - answered as {"error": ...}
        return exc


def error_message(exc: BaseException) -> str:
    """Text of an ``{"error": ...}`` reply: our errors as-is, others prefixed by their type."""
    if isinstance(exc, (PolicyServeError, AssertionError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
