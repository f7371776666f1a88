"""GR00T-wire front door: a ZeroMQ ROUTER server that hands requests to the serving scheduler.

A ROUTER socket accepts GR00T's REQ clients and DEALER clients. The I/O thread receives, checks
(size over all frames, envelope, msgpack, token, endpoint) and answers ``ping``, ``kill`` and
``get_modality_config`` itself, at once; ``get_action``, ``reset`` and custom endpoints go to the
:class:`~policyserve.serving.scheduler.Scheduler` (batching, limits, fairness), whose workers hand
encoded replies back to the I/O thread through a queue and a wake-up pipe, because ZeroMQ sockets
are not thread-safe.

Other front doors (:class:`~policyserve.serving.doors.base.FrontDoor`: the openpi websocket door, the
metrics endpoint) are added with :meth:`PolicyServer.add_front_door` and share the scheduler; with
``port=None`` the server has no ZeroMQ socket and serves through them only.

Shutdown (``kill``, :meth:`PolicyServer.stop`, SIGTERM/Ctrl-C in ``policyserve serve``): stop reading (every
door), answer queued requests with ``{"error": "server shutting down"}``, finish and answer the calls in
progress, send what is pending, then close.
"""

from __future__ import annotations

import errno
import hmac
import os
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from ..errors import ConfigError, PolicyServeError, ProtocolError
from ..policies.base import BasePolicy
from .backend import Backend, PolicyBackend
from .events import Listeners, SchedulerListener
from .doors.base import FrontDoor
from .scheduler import SHUTTING_DOWN, Request, Scheduler, SchedulerConfig, ServerBusyError, error_message
from ..wire.gr00t import packb, unpackb

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
PING_REPLY = {"status": "ok", "message": "Server is running"}
QUEUED_ENDPOINT_ARGS = {"get_action": {"observation", "options"}, "reset": {"options"}}
_RECV_BURST = 256  # messages read per wake-up before pending replies are sent again

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "AddressInUseError", "EndpointHandler", "PolicyServer", "error_message"]


class AddressInUseError(ConfigError):
    """The server's port is taken."""


@dataclass
class EndpointHandler:
    handler: Callable[..., Any] | None
    """None for ``get_action`` and ``reset``: the scheduler serves them through the backend."""
    requires_input: bool = True
    inline: bool = False
    """Answer on the I/O thread (cheap, must not block) instead of a scheduler worker."""


class _LogListener(SchedulerListener):
    def failed(self, request: Request, exc: BaseException) -> None:
        _log_error(exc)


def _log_error(exc: BaseException) -> None:
    print(f"Error in server: {error_message(exc)}", flush=True)
    if not isinstance(exc, PolicyServeError):
        traceback.print_exception(exc)


class PolicyServer:
    """Serve ``policy`` (or a ``backend``) on ``tcp://host:port`` until ``kill`` or :meth:`stop`.

    ``port=0`` picks a free port (see :attr:`port` after :meth:`bind`); ``port=None`` opens no ZeroMQ
    socket (the server then serves through the front doors added with :meth:`add_front_door`).
    ``api_token``, when set, is required on every request, ``kill`` included. A message (all its frames) larger than
    ``max_message_bytes`` is answered with an error; libzmq drops frames over ``hard_limit_bytes``
    (default 4x) before allocating them, disconnecting that peer. Batching and queue limits are the
    :class:`SchedulerConfig` fields, passed as keyword arguments.
    """

    def __init__(
        self,
        policy: BasePolicy | None = None,
        host: str = "127.0.0.1",
        port: int | None = 5555,
        api_token: str | None = None,
        *,
        backend: Backend | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        hard_limit_bytes: int | None = None,
        batch_window_ms: float = 0.0,
        max_batch_size: int = 32,
        rejoin_wait_ms: float = 5.0,
        max_queued_per_client: int = 64,
        max_queued_bytes: int = 1 << 30,
        shutdown_timeout: float = 60.0,
        listener: SchedulerListener | None = None,
        verbose: bool = True,
    ) -> None:
        if (policy is None) == (backend is None):
            raise ValueError("PolicyServer needs exactly one of policy or backend")
        self.policy = policy
        self.backend = backend or PolicyBackend(policy)  # type: ignore[arg-type]
        self.host, self._requested_port = host, port
        self.api_token = api_token
        self.max_message_bytes = max_message_bytes
        self.hard_limit_bytes = hard_limit_bytes or 4 * max_message_bytes
        self.shutdown_timeout = shutdown_timeout
        self.verbose = verbose
        self.config = SchedulerConfig(
            max_batch_size=max_batch_size, batch_window_ms=batch_window_ms, rejoin_wait_ms=rejoin_wait_ms,
            max_queued_per_client=max_queued_per_client, max_queued_bytes=max_queued_bytes,
            workers=self.backend.concurrency,
        )
        self.listener = Listeners(listener, _LogListener() if verbose else None)
        """Every event of the scheduler and the front doors goes here (see :meth:`add_listener`)."""
        self.scheduler = Scheduler(self.backend, self.config, self.listener)
        self.front_doors: list[FrontDoor] = []
        self._bound = False
        self._endpoints: dict[str, EndpointHandler] = {}
        self._context = zmq.Context()
        self._socket: zmq.Socket | None = None
        self._outbox: deque[list[Any]] = deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._stop_requested = threading.Event()
        self._listening = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self.endpoint: str | None = None
        self.port: int | None = None

        self.register_endpoint("ping", lambda: PING_REPLY, requires_input=False, inline=True)
        self.register_endpoint("kill", self._kill, requires_input=False, inline=True)
        self._endpoints["get_action"] = EndpointHandler(None)
        self._endpoints["reset"] = EndpointHandler(None)
        self.register_endpoint("get_modality_config", self.backend.get_modality_config, requires_input=False,
                               inline=True)

    # -- endpoints -------------------------------------------------------------------------------
    def register_endpoint(
        self, name: str, handler: Callable[..., Any], requires_input: bool = True, inline: bool = False
    ) -> None:
        """Add or replace an endpoint; ``handler(**data)`` when ``requires_input`` else ``handler()``."""
        self._endpoints[name] = EndpointHandler(handler, requires_input, inline)

    def _kill(self) -> None:
        self._stop_requested.set()
        return None

    # -- front doors and listeners ---------------------------------------------------------------
    def add_front_door(self, door: FrontDoor) -> None:
        """Serve through ``door`` too (before :meth:`bind`/:meth:`start`); it is bound, started and
        stopped with the server."""
        if self._bound:
            raise RuntimeError("add front doors before the server binds")
        self.front_doors.append(door)

    def add_listener(self, listener: SchedulerListener) -> None:
        """Also report scheduler and front-door events to ``listener`` (before :meth:`start`)."""
        self.listener.listeners.append(listener)

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """True once the server has shut down and released its port."""
        return self._closed.is_set()

    def bind(self) -> int | None:
        """Bind the socket and the front doors (idempotent); returns the ZeroMQ port (None without one).
        A taken port raises :class:`AddressInUseError` and leaves nothing open."""
        if self._bound:
            return self.port
        if self._requested_port is not None:
            self._bind_socket()
        bound: list[FrontDoor] = []
        try:
            for door in self.front_doors:
                door.bind(self)
                bound.append(door)
        except BaseException:
            for door in bound:
                door.close(0)
            if self._socket is not None:
                self._socket.close(linger=0)
                self._socket = None
            self._release()
            raise
        self._bound = True
        return self.port

    def _bind_socket(self) -> None:
        sock = self._context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.hard_limit_bytes)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        port = "*" if self._requested_port == 0 else str(self._requested_port)
        host = "*" if self.host in ("0.0.0.0", "*") else self.host
        try:
            sock.bind(f"tcp://{host}:{port}")
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            self._release()
            if exc.errno == errno.EADDRINUSE:
                raise AddressInUseError(f"port {self._requested_port} on {self.host} is in use") from None
            raise ConfigError(f"cannot listen on tcp://{self.host}:{self._requested_port}: {exc}") from None
        self._socket = sock
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.port = int(self.endpoint.rsplit(":", 1)[1])

    def start(self, timeout: float = 10.0) -> int | None:
        """Run the server on a background thread; returns the bound port once it is listening."""
        port = self.bind()
        self._thread = threading.Thread(target=self.run, name=f"policyserve-server-{port}", daemon=True)
        self._thread.start()
        if not self._listening.wait(timeout):
            raise RuntimeError(f"server did not start listening within {timeout} s")
        return port

    def stop(self, timeout: float | None = None) -> bool:
        """Shut down cleanly (see the module doc); returns once closed, or False after ``timeout`` s."""
        self._stop_requested.set()
        self._wake()
        if self._thread is None:
            if not self.closed and not self._listening.is_set():
                self._shutdown()  # never run (perhaps never bound)
            return self.closed
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
        return self.closed

    def __enter__(self) -> PolicyServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def run(self) -> None:
        """Serve until ``kill`` or :meth:`stop` (blocking)."""
        self.bind()
        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        try:
            self.scheduler.start()
            for door in self.front_doors:
                door.start()
            if self._socket is not None:
                poller.register(self._socket, zmq.POLLIN)
                if self.verbose:
                    print(f"Server is ready and listening on {self.endpoint}", flush=True)
            self._listening.set()
            while not self._stop_requested.is_set():
                events = dict(poller.poll(1000))
                if self._wake_r in events:
                    self._drain_wake()
                self._send_pending()
                if self._socket in events:
                    self._receive_burst()
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        if self.verbose:
            print("Shutting down server: answering queued requests, finishing calls in progress...", flush=True)
        for door in self.front_doors:
            door.stop_reading()
        finished = self.scheduler.close(self.shutdown_timeout)
        if not finished and self.verbose:
            print(f"A policy call did not finish within {self.shutdown_timeout} s; closing anyway.", flush=True)
        for door in self.front_doors:
            door.close(2.0)
        if self._socket is not None:
            self._send_pending()
            self._refuse_unread()
            self._socket.close(linger=2000)  # let the last replies leave
            self._socket = None
        self.backend.close()
        self._release()
        if self.verbose:
            print("Server stopped.", flush=True)

    def _refuse_unread(self) -> None:
        """Answer requests that reached the socket but were not read with "server shutting down"."""
        assert self._socket is not None
        for _ in range(100_000):
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.ZMQError:
                return
            if len(frames) == 2:
                self._reply_now([frames[0].bytes], {"error": SHUTTING_DOWN})
            elif len(frames) >= 3:
                self._reply_now([frames[0].bytes, b""], {"error": SHUTTING_DOWN})

    def _release(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._context.term()
        self._closed.set()

    # -- replies ---------------------------------------------------------------------------------
    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # already signalled (pipe full) or closed

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _send_pending(self) -> None:
        if self._socket is None:
            return
        while self._outbox:
            self._socket.send_multipart(self._outbox.popleft(), copy=False)

    def _replier(self, envelope: list[bytes]) -> Callable[[Any], None]:
        """Reply callback for a scheduled request: encodes on the worker, sends on the I/O thread."""

        def reply(payload: Any) -> None:
            self._outbox.append([*envelope, _encode(payload)])
            self._wake()

        return reply

    def _reply_now(self, envelope: list[bytes], payload: Any) -> None:
        assert self._socket is not None
        self._socket.send_multipart([*envelope, _encode(payload)], copy=False)

    # -- requests --------------------------------------------------------------------------------
    def _receive_burst(self) -> None:
        assert self._socket is not None
        for _ in range(_RECV_BURST):
            if self._stop_requested.is_set():
                return
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._handle(frames)

    def _handle(self, frames: list[zmq.Frame]) -> None:
        received = time.perf_counter()
        if len(frames) < 2:
            return  # no routing identity: nothing can be answered
        identity = frames[0].bytes
        envelope = [identity, b""]
        endpoint: Any = "unknown"
        try:
            if len(frames) == 2:
                envelope = [identity]  # DEALER
            elif len(frames) == 3 and len(frames[1]) == 0:
                envelope = [identity, b""]  # REQ (or a DEALER sending the empty delimiter)
            else:
                self.listener.invalid("gr00t", endpoint)
                self._reply_now([identity, b""], {"error": (
                    f"malformed request: {len(frames) - 1} frames after the routing id; a GR00T request is one "
                    "msgpack frame, behind an empty delimiter frame for REQ clients")})
                return
            size = sum(len(f) for f in frames[1:])
            if size > self.max_message_bytes:
                raise ProtocolError(
                    f"message of {size} bytes exceeds the server's max_message_bytes={self.max_message_bytes}")
            body = frames[-1]
            request = unpackb(body.buffer, writable=True)
            if not isinstance(request, dict):
                raise ProtocolError(f"request must be a msgpack map, got {type(request).__name__}")
            if not self._authorized(request):
                self.listener.unauthorized("gr00t")
                self._reply_now(envelope, {"error": "Unauthorized: Invalid API token"})
                return
            endpoint = request.get("endpoint", "get_action")
            spec = self._endpoints.get(endpoint) if isinstance(endpoint, str) else None
            if spec is None:
                raise ProtocolError(f"Unknown endpoint: {endpoint}")
            data = (request.get("data") or {}) if spec.requires_input else {}
            if not isinstance(data, dict):
                raise ProtocolError(f"request 'data' must be a map of arguments, got {type(data).__name__}")
            if spec.inline:
                self._reply_now(envelope, spec.handler(**data) if spec.requires_input else spec.handler())
                if self._stop_requested.is_set():
                    self._wake()
                return
            self.scheduler.submit(self._scheduled(endpoint, spec, data, envelope, size, received))
        except Exception as exc:  # noqa: BLE001 - every error is answered, the server keeps serving
            if not isinstance(exc, ServerBusyError):
                known = isinstance(endpoint, str) and endpoint in self._endpoints
                self.listener.invalid("gr00t", endpoint if known else "unknown")
                if self.verbose:
                    _log_error(exc)
            self._reply_now(envelope, {"error": error_message(exc)})

    def _scheduled(self, endpoint: str, spec: EndpointHandler, data: dict, envelope: list[bytes], size: int,
                   received: float) -> Request:
        client = envelope[0].hex()
        reply = self._replier(envelope)
        if spec.handler is None:
            unexpected = sorted(set(data) - QUEUED_ENDPOINT_ARGS[endpoint])
            if unexpected:
                expected = " and ".join(repr(a) for a in sorted(QUEUED_ENDPOINT_ARGS[endpoint]))
                raise ProtocolError(f"{endpoint} takes {expected}; got unexpected {', '.join(map(repr, unexpected))}")
            return Request(client, endpoint, data, reply, nbytes=size, received=received)
        call = (lambda: spec.handler(**data)) if spec.requires_input else spec.handler
        return Request(client, endpoint, data, reply, nbytes=size, received=received, call=call)

    def _authorized(self, request: dict) -> bool:
        if self.api_token is None:
            return True
        token = request.get("api_token")
        if not isinstance(token, str):
            return False
        return hmac.compare_digest(token.encode(), self.api_token.encode())


def _encode(payload: Any) -> bytes:
    try:
        return packb(payload)
    except Exception as exc:  # noqa: BLE001 - unencodable handler result
        return packb({"error": f"could not encode reply: {error_message(exc)}"})
