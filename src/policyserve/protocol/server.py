"""ZeroMQ policy server speaking GR00T's wire protocol, for many clients at once.

A ROUTER socket accepts both GR00T's REQ clients and DEALER clients. Cheap endpoints (``ping``,
``kill``, ``get_modality_config``) are answered on the I/O thread straight away; policy calls run on a
worker thread, so one client's slow ``get_action`` never delays another client's ``ping``. Replies
go back through an inproc socket because ZeroMQ sockets are not thread-safe.

When the policy sets ``batchable = True`` and ``batch_window_ms > 0``, ``get_action`` requests that
arrive together from different clients are merged into one batched policy call.
"""

from __future__ import annotations

import hmac
import itertools
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from ..errors import PolicyServeError, ProtocolError
from ..policies.base import BasePolicy
from . import batching
from .codec import packb, unpackb

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
PING_REPLY = {"status": "ok", "message": "Server is running"}
_inproc_ids = itertools.count()


@dataclass
class EndpointHandler:
    handler: Callable[..., Any]
    requires_input: bool = True
    inline: bool = False
    """Answer on the I/O thread (cheap, must not block) instead of the policy worker."""


@dataclass
class _Job:
    envelope: list[bytes]
    endpoint: str
    data: dict[str, Any]
    received: float


def error_message(exc: BaseException) -> str:
    """Text of an ``{"error": ...}`` reply: our errors as-is, others prefixed by their type."""
    if isinstance(exc, (PolicyServeError, AssertionError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class PolicyServer:
    """Serve ``policy`` on ``tcp://host:port`` until ``kill`` or :meth:`stop`.

    ``port=0`` picks a free port (see :attr:`port` after :meth:`bind`). ``api_token``, when set, is
    required on every request, ``kill`` included. Messages larger than ``max_message_bytes`` are
    answered with an error; libzmq drops frames over ``hard_limit_bytes`` (default 4x) before
    allocating them, disconnecting that peer.
    """

    def __init__(
        self,
        policy: BasePolicy,
        host: str = "127.0.0.1",
        port: int = 5555,
        api_token: str | None = None,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        hard_limit_bytes: int | None = None,
        batch_window_ms: float = 0.0,
        max_batch_size: int = 256,
        verbose: bool = True,
    ) -> None:
        self.policy = policy
        self.host, self._requested_port = host, port
        self.api_token = api_token
        self.max_message_bytes = max_message_bytes
        self.hard_limit_bytes = hard_limit_bytes or 4 * max_message_bytes
        self.batch_window_ms = batch_window_ms
        self.max_batch_size = max_batch_size
        self.verbose = verbose
        self._endpoints: dict[str, EndpointHandler] = {}
        self._context = zmq.Context()
        self._socket: zmq.Socket | None = None
        self._replies: zmq.Socket | None = None
        self._reply_addr = f"inproc://policyserve-replies-{id(self)}-{next(_inproc_ids)}"
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._running = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self.endpoint: str | None = None
        self.port: int | None = None

        self.register_endpoint("ping", lambda: PING_REPLY, requires_input=False, inline=True)
        self.register_endpoint("kill", self._kill, requires_input=False, inline=True)
        self.register_endpoint("get_action", self._get_action)
        self.register_endpoint("reset", self._reset)
        self.register_endpoint(
            "get_modality_config", getattr(policy, "get_modality_config", lambda: {}), requires_input=False, inline=True
        )

    # -- endpoints -------------------------------------------------------------------------------
    def register_endpoint(
        self, name: str, handler: Callable[..., Any], requires_input: bool = True, inline: bool = False
    ) -> None:
        """Add or replace an endpoint; ``handler(**data)`` when ``requires_input`` else ``handler()``."""
        self._endpoints[name] = EndpointHandler(handler, requires_input, inline)

    def _kill(self) -> None:
        self._running.clear()
        return None

    def _get_action(self, observation: Any = None, options: dict | None = None) -> list[Any]:
        action, info = self.policy.get_action(observation, options)
        return [action, info]

    def _reset(self, options: dict | None = None) -> Any:
        return self.policy.reset(options)

    # -- lifecycle -------------------------------------------------------------------------------
    def bind(self) -> int:
        """Bind the socket (idempotent); returns the bound port."""
        if self._socket is not None:
            return self.port  # type: ignore[return-value]
        sock = self._context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.hard_limit_bytes)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        port = "*" if self._requested_port == 0 else str(self._requested_port)
        host = "*" if self.host in ("0.0.0.0", "*") else self.host
        sock.bind(f"tcp://{host}:{port}")
        self._socket = sock
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.port = int(self.endpoint.rsplit(":", 1)[1])
        self._replies = self._context.socket(zmq.PULL)
        self._replies.bind(self._reply_addr)
        return self.port

    def start(self) -> int:
        """Run the server on a background thread; returns the bound port once it is listening."""
        port = self.bind()
        self._thread = threading.Thread(target=self.run, name=f"policyserve-server-{port}", daemon=True)
        self._thread.start()
        self._running.wait(5)
        return port

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the loop to stop and wait for it (when started with :meth:`start`)."""
        self._running.clear()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __enter__(self) -> PolicyServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def run(self) -> None:
        """Serve until ``kill`` or :meth:`stop`."""
        self.bind()
        assert self._socket is not None and self._replies is not None
        worker = threading.Thread(target=self._worker_loop, name="policyserve-worker", daemon=True)
        worker.start()
        if self.verbose:
            print(f"Server is ready and listening on {self.endpoint}", flush=True)
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._replies, zmq.POLLIN)
        self._running.set()
        try:
            while self._running.is_set():
                events = dict(poller.poll(50))
                if self._replies in events:
                    while True:
                        try:
                            frames = self._replies.recv_multipart(zmq.NOBLOCK, copy=True)
                        except zmq.Again:
                            break
                        self._socket.send_multipart(frames)
                if self._socket in events:
                    while self._running.is_set():
                        try:
                            frames = self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._handle(frames)
        finally:
            self._running.clear()
            self._jobs.put(None)
            worker.join(5)
            self._flush_replies()
            self._close()

    def _flush_replies(self) -> None:
        assert self._replies is not None and self._socket is not None
        while True:
            try:
                self._socket.send_multipart(self._replies.recv_multipart(zmq.NOBLOCK))
            except zmq.ZMQError:
                return

    def _close(self) -> None:
        for sock in (self._socket, self._replies):
            if sock is not None:
                sock.close(linger=0)
        self._socket = self._replies = None
        self._context.term()
        self._stopped.set()
        if self.verbose:
            print("Server stopped.", flush=True)

    # -- request handling ------------------------------------------------------------------------
    def _reply(self, envelope: list[bytes], payload: Any) -> None:
        assert self._socket is not None
        try:
            body = packb(payload)
        except Exception as exc:  # noqa: BLE001 - unencodable handler result
            body = packb({"error": f"could not encode reply: {error_message(exc)}"})
        self._socket.send_multipart([*envelope, body])

    def _handle(self, frames: list[zmq.Frame]) -> None:
        received = time.perf_counter()
        envelope = [f.bytes for f in frames[:-1]]
        message = frames[-1]
        if len(frames) < 2:
            return  # no routing identity: nothing can be answered
        try:
            if len(message) > self.max_message_bytes:
                raise ProtocolError(
                    f"message of {len(message)} bytes exceeds the server's max_message_bytes={self.max_message_bytes}"
                )
            request = unpackb(message.buffer, writable=False)
            if not isinstance(request, dict):
                raise ProtocolError(f"request must be a msgpack map, got {type(request).__name__}")
            if not self._authorized(request):
                self._reply(envelope, {"error": "Unauthorized: Invalid API token"})
                return
            endpoint = request.get("endpoint", "get_action")
            if endpoint not in self._endpoints:
                raise ProtocolError(f"Unknown endpoint: {endpoint}")
            spec = self._endpoints[endpoint]
            data = (request.get("data") or {}) if spec.requires_input else {}
            if not isinstance(data, dict):
                raise ProtocolError(f"request 'data' must be a map of arguments, got {type(data).__name__}")
            if spec.inline:
                self._reply(envelope, spec.handler(**data) if spec.requires_input else spec.handler())
            else:
                self._jobs.put(_Job(envelope, endpoint, data, received))
        except Exception as exc:  # noqa: BLE001 - every error is answered, the server keeps serving
            self._log_error(exc)
            self._reply(envelope, {"error": error_message(exc)})

    def _authorized(self, request: dict) -> bool:
        if self.api_token is None:
            return True
        token = request.get("api_token")
        if not isinstance(token, str):
            return False
        return hmac.compare_digest(token.encode(), self.api_token.encode())

    def _log_error(self, exc: BaseException) -> None:
        if self.verbose:
            print(f"Error in server: {error_message(exc)}", flush=True)
            if not isinstance(exc, PolicyServeError):
                traceback.print_exception(exc)

    # -- worker ----------------------------------------------------------------------------------
    def _worker_loop(self) -> None:
        out = self._context.socket(zmq.PUSH)
        out.setsockopt(zmq.LINGER, 0)
        out.connect(self._reply_addr)
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                batch = self._collect_batch(job)
                for envelope, payload in self._run_jobs(batch):
                    try:
                        body = packb(payload)
                    except Exception as exc:  # noqa: BLE001
                        body = packb({"error": f"could not encode reply: {error_message(exc)}"})
                    out.send_multipart([*envelope, body])
        finally:
            out.close(linger=0)

    def _collect_batch(self, first: _Job) -> list[_Job]:
        if not (self.batch_window_ms > 0 and getattr(self.policy, "batchable", False)
                and first.endpoint == "get_action" and self._endpoints["get_action"].handler == self._get_action):
            return [first]
        batch, deadline = [first], time.perf_counter() + self.batch_window_ms / 1000
        while len(batch) < self.max_batch_size:
            remaining = deadline - time.perf_counter()
            try:
                job = self._jobs.get(timeout=max(remaining, 0)) if remaining > 0 else self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is None or job.endpoint != "get_action":
                self._jobs.put(job)  # handled after this batch; order among different endpoints is kept per client
                break
            batch.append(job)
        return batch

    def _run_jobs(self, jobs: list[_Job]) -> list[tuple[list[bytes], Any]]:
        if len(jobs) > 1:
            merged = self._run_merged(jobs)
            if merged is not None:
                return merged
        return [(job.envelope, self._run_one(job)) for job in jobs]

    def _run_one(self, job: _Job) -> Any:
        spec = self._endpoints[job.endpoint]
        start = time.perf_counter()
        try:
            result = spec.handler(**job.data) if spec.requires_input else spec.handler()
        except Exception as exc:  # noqa: BLE001 - answered as {"error": ...}
            self._log_error(exc)
            return {"error": error_message(exc)}
        if job.endpoint == "get_action":
            self._add_timing(result, job.received, start, 1)
        return result

    def _run_merged(self, jobs: list[_Job]) -> list[tuple[list[bytes], Any]] | None:
        observations = [job.data.get("observation") for job in jobs]
        options = [job.data.get("options") for job in jobs]
        if any(o is not None for o in options) or not all(isinstance(o, dict) for o in observations):
            return None
        try:
            if not batching.can_merge(observations):
                return None
            for obs in observations:  # validate each request so one bad one cannot fail the others
                if self.policy.strict:
                    self.policy.check_observation(obs)
            merged, sizes = batching.merge_observations(observations)
        except Exception:  # noqa: BLE001 - fall back to one call per request, which reports errors
            return None
        start = time.perf_counter()
        try:
            action, info = self.policy.get_action(merged, None)
            parts = batching.split_actions(action, sizes)
        except Exception as exc:  # noqa: BLE001
            self._log_error(exc)
            return [(job.envelope, {"error": error_message(exc)}) for job in jobs]
        replies = []
        for job, part in zip(jobs, parts):
            result = [part, dict(info)]
            self._add_timing(result, job.received, start, len(jobs))
            replies.append((job.envelope, result))
        return replies

    @staticmethod
    def _add_timing(result: Any, received: float, policy_start: float, merged_requests: int) -> None:
        if isinstance(result, list) and len(result) == 2 and isinstance(result[1], dict):
            now = time.perf_counter()
            result[1]["server_timing"] = {
                "recv_to_reply_ms": (now - received) * 1000,
                "policy_ms": (now - policy_start) * 1000,
                "queue_ms": (policy_start - received) * 1000,
                "merged_requests": merged_requests,
            }
