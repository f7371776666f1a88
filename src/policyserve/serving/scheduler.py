"""One scheduler between the front doors and a policy backend; it speaks no wire format.

Front doors hand it :class:`~policyserve.serving.request.Request` objects with a reply callback; it
queues them per client, within limits, and worker threads serve them through the backend, answering
each request with a typed :data:`~policyserve.serving.request.Outcome` (an action result with its
timing, a call result, or a failure):

- **fair**: clients take turns (round-robin by identity); a client's own requests stay in order, and
  at most one batch per client is in flight, so replies never overtake each other;
- **continuous batching**: while a policy call runs, requests queue; when it returns, every queued
  ``get_action`` that can share a call (equal options, same observation layout) goes into the next
  one, up to ``max_batch_size`` requests, taken round-robin across clients with at most a fair share
  (:meth:`Scheduler.fair_share`) per client, so a flooder cannot fill the batch another client joins.
  Clients the previous merged call answered are given up to ``rejoin_wait_ms`` (at most half that
  call's time) to send their next request, so closed-loop clients stay together instead of splitting
  into small batches; a lone client pays no batching delay (``batch_window_ms`` adds an optional wait);
- **bounded**: per-client and total-bytes (decoded size) limits; a request over one is refused at once with
  :class:`~policyserve.serving.request.ServerBusyError`, never left waiting; a get_action with more rows
  than ``max_request_batch`` is refused as invalid;
- **clean shutdown**: :meth:`Scheduler.close` answers everything queued with a "server shutting down"
  failure and waits for the calls in progress to be answered.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, ProtocolError
from ..policies.base import merge_key
from ..policies.batching import batch_size_of, layout_key
from .backend import Backend
from .events import NULL_LISTENER, SchedulerListener
from .request import (
    SHUTTING_DOWN, ActionResult, CallResult, Failure, FailureKind, Outcome, Request, ServerBusyError,
    ShuttingDownError, Timing,
)

__all__ = ["SHUTTING_DOWN", "Scheduler", "SchedulerConfig", "ServerBusyError", "ShuttingDownError"]


@dataclass
class SchedulerConfig:
    """Limits and batching of a :class:`Scheduler`."""

    max_batch_size: int = 32
    """Most get_action requests merged into one policy call (continuous batching); 1 turns merging off."""
    batch_window_ms: float = 0.0
    """Extra wait for more requests before a policy call that is not full (0: continuous batching only)."""
    rejoin_wait_ms: float = 5.0
    """After a merged call, how long to wait (at most half the call's time) for the clients it answered to send
    again, so they stay in one batch; never for a lone client (0: never wait)."""
    max_queued_per_client: int = 64
    """Requests one client may have waiting; more are refused as busy at once."""
    max_queued_bytes: int = 1 << 30
    """Total size in bytes of the waiting requests (decoded, as they sit in memory); more are refused as busy
    at once."""
    max_request_batch: int = 1024
    """Most rows (batch size) one get_action request may carry; a larger one is refused, naming this limit."""
    workers: int = 1
    """Policy calls in flight at once (one per backend replica; the server sets it from the backend)."""

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "workers", "max_request_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


class Scheduler:
    """Queues requests per client and serves them on worker threads through ``backend``."""

    def __init__(self, backend: Backend, config: SchedulerConfig | None = None,
                 listener: SchedulerListener | None = None) -> None:
        self.backend = backend
        self.config = config or SchedulerConfig()
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
        """Start the worker threads (``config.workers`` of them)."""
        for i in range(max(1, self.config.workers)):
            thread = threading.Thread(target=self._work, name=f"policyserve-worker-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def submit(self, request: Request) -> None:
        """Queue ``request``; raises :class:`ServerBusyError` (:class:`ShuttingDownError` once closed) at once
        if refused."""
        cfg = self.config
        with self._lock:
            if self._closed:
                raise ShuttingDownError()
            if request.endpoint == "get_action":
                self._check_rows(request)
            self._check_client_room(request)
            queue = self._queues.get(request.client)
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

    def check_room(self, request: Request) -> None:
        """Raise :class:`ServerBusyError` now if ``request``'s client has ``max_queued_per_client`` requests queued
        (what :meth:`submit` would refuse first): a door asks this before decoding a request's payload, so a
        client that floods past its queue costs no decoding. ``request.data`` may still be empty."""
        with self._lock:
            self._check_client_room(request)

    def _check_client_room(self, request: Request) -> None:
        queue = self._queues.get(request.client)
        limit = self.config.max_queued_per_client
        if queue is not None and len(queue) >= limit:
            self.listener.rejected(request, "max_queued_per_client")
            raise ServerBusyError(f"server busy: this client already has {len(queue)} requests queued "
                                  f"(max_queued_per_client={limit}); wait for replies before sending more")

    def _check_rows(self, request: Request) -> None:
        observation, options = request.data.get("observation"), request.data.get("options")
        try:
            if observation is None and isinstance(options, dict):  # e.g. replay: options["batch_size"] rows
                size = options.get("batch_size", 1)
                rows = size if isinstance(size, int) else 1
            else:
                rows = batch_size_of(observation)
        except (ValueError, TypeError):
            return  # the policy's validation names what is wrong with the observation
        if rows > self.config.max_request_batch:
            raise ProtocolError(
                f"get_action request has {rows} rows (batch size); the server takes at most "
                f"max_request_batch={self.config.max_request_batch} per request: split it")

    @property
    def queued(self) -> int:
        """Requests waiting (not yet in a policy call)."""
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
            self._answer(request, Failure(FailureKind.SHUTTING_DOWN, SHUTTING_DOWN))
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

    def fair_share(self, first: Request) -> int:
        """Most requests one client may put into a merged call that ``first`` opens: ``max_batch_size`` split
        evenly between the clients with queued work and the clients of the previous merged call (who are
        expected back), so a flooder's queue cannot fill a batch another client joins."""
        active = {first.client, *(c for c in self._turns if self._queues.get(c)), *self._rejoining}
        active -= self._busy_clients
        active.add(first.client)
        return max(1, -(-self.config.max_batch_size // len(active)))

    def _companions(self, first: Request) -> list[Request]:
        """Queued get_action requests that can share ``first``'s call, taken round-robin across clients (one
        per client per round), at most :meth:`fair_share` per client, a client's requests only from the head
        of its queue (order per client is kept)."""
        key = self._key(first)
        taken: list[Request] = []
        room = self.config.max_batch_size - 1
        share = self.fair_share(first)
        counts = {first.client: 1}
        # ``first``'s client may contribute more requests, then every client in turn, repeatedly.
        order = [first.client, *self._turns]
        progress = True
        while room > 0 and progress:
            progress = False
            for client in order:
                queue = self._queues.get(client)
                if not queue or room == 0 or counts.get(client, 0) >= share or queue[0].endpoint != "get_action" \
                        or self._key(queue[0]) != key:
                    continue
                taken.append(self._take(client))
                counts[client] = counts.get(client, 0) + 1
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
            results = _run(lambda: self.backend.run_batch(batch))
            if isinstance(results, BaseException):
                results = [results] * len(batch)
        elif first.endpoint == "reset":
            results = [_run(lambda: self.backend.reset(first.data.get("options"), first.client))]
        else:
            assert first.call is not None
            results = [_run(first.call)]
        end = time.perf_counter()
        if first.endpoint == "get_action":
            self._last_call_ms = (end - start) * 1000
        self.listener.batch(first.endpoint, len(batch), (end - start) * 1000)
        for request, result in zip(batch, results):
            outcome: Outcome
            if isinstance(result, BaseException):
                self.listener.failed(request, result)
                outcome = Failure.from_exception(result)
            elif request.endpoint == "get_action":
                action, info = result
                outcome = ActionResult(action, dict(info), Timing(
                    queue_ms=(start - request.received) * 1000, policy_ms=(end - start) * 1000,
                    merged_requests=len(batch), recv_to_reply_ms=0.0))
            else:
                outcome = CallResult(result)
            self._answer(request, outcome, start, end)

    def _answer(self, request: Request, outcome: Outcome, start: float | None = None,
                end: float | None = None) -> None:
        if isinstance(outcome, ActionResult):
            outcome.timing.recv_to_reply_ms = (time.perf_counter() - request.received) * 1000
        try:  # counted before the reply leaves: a client that has its reply finds it in the metrics
            self.listener.answered(request, not isinstance(outcome, Failure), start, end)
        finally:
            request.reply(outcome)


def _run(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except Exception as exc:  # noqa: BLE001 - answered as a Failure
        return exc
