"""GR00T door: GR00T's ZeroMQ protocol (msgpack+NPY over a ROUTER socket) in front of the scheduler.

A ROUTER socket accepts GR00T's REQ clients and DEALER clients. The door's I/O thread receives, checks
(size over all frames, envelope, msgpack, token, endpoint) and answers ``ping``, ``kill`` and
``get_modality_config`` itself, at once; ``get_action``, ``reset`` and custom endpoints become
:class:`~policyserve.serving.request.Request` objects for the scheduler. Scheduler workers encode the
outcomes (``[action, info]`` with ``info["server_timing"]``, a call's value, or ``{"error": message}``)
and hand the frames back to the I/O thread through a queue and a wake-up pipe, because ZeroMQ sockets
are not thread-safe.

On shutdown the door stops reading first; on close it sends what is pending, answers requests that
reached the socket unread with ``{"error": "server shutting down"}`` and closes the socket.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from ...errors import PolicyServeError, ProtocolError
from ...security import CurveServer, curve_server
from ...wire.gr00t import packb, unpackb
from ..request import (
    SHUTTING_DOWN, ActionResult, CallResult, Failure, FailureKind, Outcome, Request, error_message,
)
from .base import UNAUTHORIZED, DoorContext, FrontDoor, listening

PROTOCOL = "gr00t"
DEFAULT_PORT = 5555
PING_REPLY = {"status": "ok", "message": "Server is running"}
QUEUED_ENDPOINT_ARGS = {"get_action": {"observation", "options"}, "reset": {"options"}}
_RECV_BURST = 256  # messages read per wake-up before pending replies are sent again
_MAX_ENVELOPE_FRAMES = 4  # request-id frames a REQ envelope may carry, the delimiter included
_MAX_ENVELOPE_FRAME_BYTES = 255  # ZeroMQ ids are at most 255 bytes: larger frames are not an envelope

__all__ = ["DEFAULT_PORT", "EndpointHandler", "Gr00tDoor", "encode_outcome", "log_error"]


@dataclass
class EndpointHandler:
    """How the door serves one endpoint name."""

    handler: Callable[..., Any] | None
    """None for ``get_action`` and ``reset``: the scheduler serves them through the backend."""
    requires_input: bool = True
    """Call ``handler(**data)`` (else ``handler()``)."""
    inline: bool = False
    """Answer on the I/O thread (cheap, must not block) instead of a scheduler worker."""


def encode_outcome(outcome: Outcome) -> Any:
    """The GR00T reply payload of an outcome: ``[action, info]`` (``info["server_timing"]`` holds
    ``queue_ms``, ``policy_ms``, ``merged_requests``, ``recv_to_reply_ms`` after the policy's own entries),
    a call's value, or ``{"error": message}``."""
    if isinstance(outcome, ActionResult):
        timing = outcome.timing
        info = outcome.info
        info["server_timing"] = {
            **info.get("server_timing", {}), "queue_ms": timing.queue_ms, "policy_ms": timing.policy_ms,
            "merged_requests": timing.merged_requests, "recv_to_reply_ms": timing.recv_to_reply_ms,
        }
        return [outcome.action, info]
    if isinstance(outcome, CallResult):
        return outcome.value
    return {"error": outcome.message}


def _encode(payload: Any) -> bytes:
    try:
        return packb(payload)
    except Exception as exc:  # noqa: BLE001 - unencodable handler result
        return packb({"error": f"could not encode reply: {error_message(exc)}"})


class Gr00tDoor(FrontDoor):
    """Serve GR00T ``PolicyClient``/REQ/DEALER clients on ``tcp://host:port`` (``port=0`` picks a free port;
    ``host`` defaults to the server's)."""

    name = protocol = PROTOCOL

    def __init__(self, port: int = DEFAULT_PORT, host: str | None = None) -> None:
        self.requested_port, self.host = port, host
        self.port: int | None = None
        self.endpoint: str | None = None
        """``tcp://host:port`` once bound."""
        self._ctx: DoorContext | None = None
        self._endpoints: dict[str, EndpointHandler] = {
            "ping": EndpointHandler(lambda: PING_REPLY, requires_input=False, inline=True),
            "kill": EndpointHandler(self._kill, requires_input=False, inline=True),
            "get_action": EndpointHandler(None),
            "reset": EndpointHandler(None),
            "get_modality_config": EndpointHandler(self._modality_config, requires_input=False, inline=True),
        }
        self._zmq: zmq.Context | None = None
        self._socket: zmq.Socket | None = None
        self._outbox: deque[list[Any]] = deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._reading = threading.Event()
        self._stopped_reading = threading.Event()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._fds_closed = False
        self._curve: CurveServer | None = None

    # -- endpoints -------------------------------------------------------------------------------
    def register_endpoint(self, name: str, handler: Callable[..., Any], requires_input: bool = True,
                          inline: bool = False) -> None:
        """Add or replace an endpoint; ``handler(**data)`` when ``requires_input`` else ``handler()``."""
        self._endpoints[name] = EndpointHandler(handler, requires_input, inline)

    def _modality_config(self) -> Any:
        assert self._ctx is not None
        return self._ctx.modality_config

    def _kill(self) -> None:
        self._reading.clear()  # requests behind the kill are answered "shutting down" on close
        assert self._ctx is not None
        self._ctx.request_stop()
        return None

    # -- lifecycle -------------------------------------------------------------------------------
    def bind(self, context: DoorContext) -> int:
        self._ctx = context
        self.host = self.host or context.host
        self._zmq = zmq.Context()
        sock = self._zmq.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, context.hard_limit_bytes)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a client reconnecting with its routing id takes it over
        if context.curve_secret_key is not None:
            try:
                self._curve = curve_server(self._zmq, sock, context.curve_secret_key, context.curve_authorized_keys)
            except BaseException:
                sock.close(linger=0)
                self._release()
                raise
        port = "*" if self.requested_port == 0 else str(self.requested_port)
        host = "*" if self.host in ("0.0.0.0", "*") else self.host
        try:
            with listening(f"tcp://{self.host}:{self.requested_port}", self.host, self.requested_port):
                sock.bind(f"tcp://{host}:{port}")
        except BaseException:
            sock.close(linger=0)
            self._release()
            raise
        self._socket = sock
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.port = int(self.endpoint.rsplit(":", 1)[1])
        return self.port

    def start(self) -> None:
        assert self._socket is not None, "bind() first"
        self._reading.set()
        self._thread = threading.Thread(target=self._run, name=f"policyserve-gr00t-{self.port}", daemon=True)
        self._thread.start()

    def stop_reading(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            return
        self._reading.clear()
        self._wake()
        self._stopped_reading.wait(5.0)

    def close(self, timeout: float) -> None:
        self._reading.clear()
        self._closing.set()
        if self._thread is not None and self._thread.is_alive():
            self._wake()
            self._thread.join(timeout + 5.0)
        elif self._socket is not None:  # never started
            self._finish()
        self._release()

    def _release(self) -> None:
        if not self._fds_closed:
            self._fds_closed = True
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass
        if self._curve is not None:
            self._curve.stop()
            self._curve = None
        if self._zmq is not None:
            self._zmq.term()
            self._zmq = None

    # -- I/O thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        assert self._socket is not None
        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        poller.register(self._socket, zmq.POLLIN)
        reading = True
        try:
            while not self._closing.is_set():
                if reading and not self._reading.is_set():
                    poller.unregister(self._socket)
                    reading = False
                    self._stopped_reading.set()
                events = dict(poller.poll(1000))
                if self._wake_r in events:
                    self._drain_wake()
                self._send_pending()
                if reading and self._socket in events:
                    self._receive_burst()
        finally:
            self._stopped_reading.set()
            self._finish()

    def _finish(self) -> None:
        """Send what is pending, answer unread requests with "server shutting down", close the socket."""
        if self._socket is None:
            return
        self._send_pending()
        self._refuse_unread()
        self._socket.close(linger=2000)  # let the last replies leave
        self._socket = None

    def _refuse_unread(self) -> None:
        assert self._socket is not None
        for _ in range(100_000):
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.ZMQError:
                return
            envelope = _envelope(frames)
            self._reply_now(envelope or [frames[0].bytes, b""], {"error": SHUTTING_DOWN})

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

    def _replier(self, envelope: list[bytes]) -> Callable[[Outcome], None]:
        """Reply callback for a scheduled request: encodes on the worker, sends on the I/O thread."""

        def reply(outcome: Outcome) -> None:
            self._outbox.append([*envelope, _encode(encode_outcome(outcome))])
            self._wake()

        return reply

    def _reply_now(self, envelope: list[bytes], payload: Any) -> None:
        assert self._socket is not None
        self._socket.send_multipart([*envelope, _encode(payload)], copy=False)

    def _receive_burst(self) -> None:
        assert self._socket is not None
        for _ in range(_RECV_BURST):
            if not self._reading.is_set():
                return
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._handle(frames)

    def _handle(self, frames: list[zmq.Frame]) -> None:
        received = time.perf_counter()
        ctx = self._ctx
        assert ctx is not None
        if len(frames) < 2:
            return  # no routing identity: nothing can be answered
        identity = frames[0].bytes
        endpoint: Any = "unknown"
        envelope = _envelope(frames)
        try:
            if envelope is None:
                envelope = [identity, b""]
                ctx.listener.invalid(PROTOCOL, endpoint)
                self._reply_now(envelope, {"error": (
                    f"malformed request: {len(frames) - 1} frames after the routing id; a GR00T request is one "
                    "msgpack frame, behind an empty delimiter frame for REQ clients")})
                return
            size = sum(len(f) for f in frames[1:])
            ctx.check_size(size)
            request = unpackb(frames[-1].buffer, writable=True)
            if not isinstance(request, dict):
                raise ProtocolError(f"request must be a msgpack map, got {type(request).__name__}")
            if not ctx.authorized(request.get("api_token")):
                ctx.listener.unauthorized(PROTOCOL)
                self._reply_now(envelope, {"error": UNAUTHORIZED})
                return
            endpoint = request.get("endpoint", "get_action")
            spec = self._endpoints.get(endpoint) if isinstance(endpoint, str) else None
            if spec is None:
                raise ProtocolError(f"Unknown endpoint: {_cut(str(endpoint))}")
            data = (request.get("data") or {}) if spec.requires_input else {}
            if not isinstance(data, dict):
                raise ProtocolError(f"request 'data' must be a map of arguments, got {type(data).__name__}")
            if spec.inline:
                self._reply_now(envelope, spec.handler(**data) if spec.requires_input else spec.handler())
                return
            ctx.submit(self._request(endpoint, spec, data, envelope, size, received))
        except Exception as exc:  # noqa: BLE001 - every error is answered, the door keeps serving
            failure = Failure.from_exception(exc)
            if failure.kind not in (FailureKind.BUSY, FailureKind.SHUTTING_DOWN):
                known = isinstance(endpoint, str) and endpoint in self._endpoints
                ctx.listener.invalid(PROTOCOL, endpoint if known else "unknown")
                if ctx.verbose:
                    log_error(exc)
            self._reply_now(envelope, encode_outcome(failure))

    def _request(self, endpoint: str, spec: EndpointHandler, data: dict, envelope: list[bytes], size: int,
                 received: float) -> Request:
        client = envelope[0].hex()
        reply = self._replier(envelope)
        if spec.handler is None:
            unexpected = sorted(set(data) - QUEUED_ENDPOINT_ARGS[endpoint])
            if unexpected:
                expected = " and ".join(repr(a) for a in sorted(QUEUED_ENDPOINT_ARGS[endpoint]))
                raise ProtocolError(f"{endpoint} takes {expected}; got unexpected "
                                    f"{', '.join(_shown(a) for a in unexpected)}")
            return Request(client, endpoint, data, reply, nbytes=size, protocol=PROTOCOL, received=received)
        handler = spec.handler
        call = (lambda: handler(**data)) if spec.requires_input else handler
        return Request(client, endpoint, data, reply, nbytes=size, protocol=PROTOCOL, received=received, call=call)


def _envelope(frames: list[zmq.Frame]) -> list[bytes] | None:
    """The frames a reply goes back behind: ``[id]`` for a DEALER, ``[id, *request ids, b""]`` for a REQ
    (``REQ_CORRELATE`` adds a request-id frame before the delimiter); None for any other shape."""
    if len(frames) == 2:
        return [frames[0].bytes]
    if 3 <= len(frames) <= 2 + _MAX_ENVELOPE_FRAMES and len(frames[-2]) == 0 \
            and all(len(f) <= _MAX_ENVELOPE_FRAME_BYTES for f in frames[1:-2]):
        return [f.bytes for f in frames[:-1]]
    return None


def _cut(text: str, limit: int = 80) -> str:
    """Client-supplied text, cut to ``limit`` characters."""
    return text if len(text) <= limit else text[:limit] + "..."


def _shown(value: Any) -> str:
    """``repr`` of a client-supplied value, cut to 80 characters."""
    return _cut(repr(value))


def log_error(exc: BaseException) -> None:
    """Print a request's error (with the traceback for errors that are not ours)."""
    import traceback

    print(f"Error in server: {error_message(exc)}", flush=True)
    if not isinstance(exc, PolicyServeError):
        traceback.print_exception(exc)

