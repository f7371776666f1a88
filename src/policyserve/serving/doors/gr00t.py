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
from ...wire.gr00t import DecodeStats, _clip, packb, peek_request, unpackb
from ..logs import SERVER_LOG
from ..request import (
    SHUTTING_DOWN, ActionResult, CallResult, Failure, FailureKind, Outcome, Request, ServerBusyError, error_message,
)
from .base import UNAUTHORIZED, DoorContext, FrontDoor, listening

PROTOCOL = "gr00t"
DEFAULT_PORT = 5555
PING_REPLY = {"status": "ok", "message": "Server is running"}
QUEUED_ENDPOINT_ARGS = {"get_action": {"observation", "options"}, "reset": {"options"}}
_RECV_BURST = 16  # messages read per wake-up before pending replies are sent again (a burst delays replies)
_MAX_ENVELOPE_FRAMES = 4  # request-id frames a REQ envelope may carry, the delimiter included
_MAX_ENVELOPE_FRAME_BYTES = 255  # ZeroMQ ids are at most 255 bytes: larger frames are not an envelope
SNDHWM = 64
"""Replies ZeroMQ queues per client; past it (the client does not read) the door holds them, counted in bytes:
past half of ``max_unsent_bytes`` held, that client's new requests are answered "server busy" (not decoded or
queued); past ``max_unsent_bytes``, replies to it are dropped. So one client costs at most ``max_unsent_bytes``
plus ``SNDHWM`` replies (each at most ``max_request_batch`` rows) plus the TCP buffers."""
MAX_BACKLOGGED_CLIENTS = 1024
"""Clients the door holds unsent replies for at once; replies to more non-reading clients are dropped."""
HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS = 10_000, 30_000
"""ZMTP heartbeats: a peer silent for 30 s (gone without closing) is disconnected and its state freed."""

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
            "get_capabilities": EndpointHandler(self._capabilities, requires_input=False, inline=True),
        }
        self._decoded_endpoints = self._decoded()
        self._zmq: zmq.Context | None = None
        self._socket: zmq.Socket | None = None
        self._outbox: deque[list[Any]] = deque()
        self._backlog: dict[bytes, deque[list[Any]]] = {}  # identity -> replies ZeroMQ had no room for
        self._backlog_bytes: dict[bytes, int] = {}
        self._max_unsent_bytes = 64 << 20
        self.dropped_replies = 0
        """Replies dropped: to clients gone, or held past ``max_unsent_bytes`` for a client that does not read."""
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
        self._decoded_endpoints = self._decoded()

    def _decoded(self) -> frozenset[str]:
        """Endpoints whose requests are decoded whole (their head is read without scanning the payload)."""
        return frozenset(name for name, spec in self._endpoints.items() if spec.requires_input)

    def _modality_config(self) -> Any:
        assert self._ctx is not None
        return self._ctx.modality_config

    def _capabilities(self) -> list[str]:
        """What the policy can do beyond a plain ``get_action`` (GR00T's servers lack this endpoint)."""
        assert self._ctx is not None
        return sorted(self._ctx.capabilities)

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
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a full pipe raises Again (held, see SNDHWM); gone: dropped
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a client reconnecting with its routing id takes it over
        sock.setsockopt(zmq.SNDHWM, SNDHWM)
        limits = getattr(context, "connections", None)
        if limits is not None:
            self._max_unsent_bytes = limits.max_unsent_bytes
            sock.setsockopt(zmq.HANDSHAKE_IVL, max(1, int(limits.open_timeout * 1000)))
        sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
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
                events = dict(poller.poll(20 if self._backlog else 1000))
                if self._wake_r in events:
                    self._drain_wake()
                self._send_held()
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
        self._send_held()
        self._send_pending()
        self._refuse_unread()
        self.dropped_replies += sum(len(q) for q in self._backlog.values())  # clients that do not read
        self._backlog.clear()
        self._backlog_bytes.clear()
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
            self._send(self._outbox.popleft())

    def _send(self, frames: list[Any]) -> None:
        """Send a reply (``frames[0]`` is the client's identity) or, when ZeroMQ's pipe to that client is full,
        hold it (in order) within ``max_unsent_bytes``; replies past that are dropped."""
        identity = frames[0]
        held = self._backlog.get(identity)
        if held is None and self._try_send(frames):
            return
        size = sum(len(f) for f in frames)
        if held is None:
            if len(self._backlog) >= MAX_BACKLOGGED_CLIENTS:
                self.dropped_replies += 1
                return
            held = self._backlog[identity] = deque()
            self._backlog_bytes[identity] = 0
        elif self._backlog_bytes[identity] + size > self._max_unsent_bytes:
            self.dropped_replies += 1
            return
        held.append(frames)
        self._backlog_bytes[identity] += size

    def _try_send(self, frames: list[Any]) -> bool:
        """True when ZeroMQ took the reply or the client is gone (dropped); False when its pipe is full."""
        assert self._socket is not None
        try:
            self._socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            self.dropped_replies += 1  # the client disconnected: nobody to answer
        return True

    def _send_held(self) -> None:
        """Retry the replies held for clients whose pipes were full; a client's state goes once it has read them."""
        for identity in list(self._backlog):
            held = self._backlog[identity]
            while held and self._try_send(held[0]):
                self._backlog_bytes[identity] -= sum(len(f) for f in held.popleft())
            if not held:
                del self._backlog[identity], self._backlog_bytes[identity]

    def _replier(self, envelope: list[bytes]) -> Callable[[Outcome], None]:
        """Reply callback for a scheduled request: encodes on the worker, sends on the I/O thread."""

        def reply(outcome: Outcome) -> None:
            self._outbox.append([*envelope, _encode(encode_outcome(outcome))])
            self._wake()

        return reply

    def _reply_now(self, envelope: list[bytes], payload: Any) -> None:
        assert self._socket is not None
        self._send([*envelope, _encode(payload)])

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
            held = self._backlog_bytes.get(identity, 0)
            if held > self._max_unsent_bytes // 2:  # it does not read: nothing more is decoded or queued for it
                raise ServerBusyError(
                    f"server busy: {held} bytes of replies to this client are waiting for it to read them "
                    f"(max_unsent_bytes={self._max_unsent_bytes}); read replies before sending more")
            # Token and endpoint first, without decoding the payload: an unauthorized request costs O(1).
            head = peek_request(frames[-1].buffer, expected_token=ctx.api_token,
                                decoded_endpoints=self._decoded_endpoints)
            if not ctx.authorized(head.api_token):
                ctx.listener.unauthorized(PROTOCOL)
                self._reply_now(envelope, {"error": UNAUTHORIZED})
                return
            endpoint = head.endpoint
            spec = self._endpoints.get(endpoint)
            if spec is None:
                raise ProtocolError(f"Unknown endpoint: {_clip(endpoint)}")
            if spec.handler is None:  # queued: a client whose queue is full is refused before decoding
                ctx.check_room(Request(envelope[0].hex(), endpoint, {}, _no_reply, protocol=PROTOCOL))
            data: Any = {}
            if spec.requires_input and head.has_data:  # endpoints without input are never decoded
                stats = DecodeStats()
                request = unpackb(frames[-1].buffer, writable=True, stats=stats)
                size = max(size, stats.decoded_bytes)  # what the queue holds: decoded size
                if not isinstance(request, dict) or not ctx.authorized(request.get("api_token")):
                    ctx.listener.unauthorized(PROTOCOL)  # the decoded message must agree with its head
                    self._reply_now(envelope, {"error": UNAUTHORIZED})
                    return
                if request.get("endpoint", "get_action") != endpoint:
                    raise ProtocolError("request 'endpoint' is given more than once with different values")
                data = request.get("data") or {}
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
                    log_error(exc, f"{PROTOCOL} {failure.kind.value}")
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


def _no_reply(outcome: Outcome) -> None:
    """The reply of a request that is only checked, never queued."""


def _envelope(frames: list[zmq.Frame]) -> list[bytes] | None:
    """The frames a reply goes back behind: ``[id]`` for a DEALER, ``[id, *request ids, b""]`` for a REQ
    (``REQ_CORRELATE`` adds a request-id frame before the delimiter); None for any other shape."""
    if len(frames) == 2:
        return [frames[0].bytes]
    if 3 <= len(frames) <= 2 + _MAX_ENVELOPE_FRAMES and len(frames[-2]) == 0 \
            and all(len(f) <= _MAX_ENVELOPE_FRAME_BYTES for f in frames[1:-2]):
        return [f.bytes for f in frames[:-1]]
    return None


def _shown(value: Any) -> str:
    """A client-supplied value (a key) for an error: strings escaped and cut to 80 characters, anything else
    named by its type only (no reprs)."""
    return repr(_clip(value, 80)) if isinstance(value, str) else f"a {type(value).__name__} key"


def log_error(exc: BaseException, kind: str | None = None) -> None:
    """Log a request's error (with the traceback for errors that are not ours): escaped, one line, at most one
    line per ``kind`` (default: the error's type) per second (:data:`~policyserve.serving.logs.SERVER_LOG`)."""
    SERVER_LOG.error(kind or type(exc).__name__, f"Error in server: {error_message(exc)}",
                     None if isinstance(exc, PolicyServeError) else exc)

