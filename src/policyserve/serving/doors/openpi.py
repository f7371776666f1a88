"""openpi door: openpi's ``WebsocketPolicyServer`` protocol in front of the shared scheduler.

Per connection, as openpi's server does: the server sends a msgpack-numpy metadata map, then answers
each binary message (a msgpack-numpy observation) with a binary msgpack-numpy action map
``{"actions": (H, D), "server_timing": {"infer_ms", "prev_total_ms", ...}}``; ``GET /healthz`` answers
200 without a handshake; ``{"__ctrl__": "episode_start"}`` resets the policy for this connection and
``{"__ctrl__": ...}`` messages are acknowledged with ``{"__ack__": ...}``. Errors go back as one text
frame (what openpi's client raises as ``RuntimeError``), but where openpi's server would then close the
connection this one keeps it open for the next request.

Observations are mapped to the policy's GR00T keys (:mod:`~policyserve.wire.openpi_keys`) and
submitted as :class:`~policyserve.serving.request.Request` objects to the same scheduler as GR00T
requests, so they are batched with them and count against the same limits. Scheduler workers encode
the typed outcomes (an action map, an ``episode_start`` acknowledgement, or a failure's text) and hand
the frames to the door's asyncio loop (its own thread) through ``loop.call_soon_threadsafe``; they go
out in request order per connection.
"""

from __future__ import annotations

import asyncio
import http
import itertools
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import websockets
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request as HttpRequest
from websockets.http11 import Response as HttpResponse

from ...errors import ConfigError, ProtocolError
from ...wire import openpi as openpi_codec
from ...wire.gr00t import DecodeStats
from ...wire.openpi_keys import OpenpiKeyMap, OpenpiMapping
from ..logs import SERVER_LOG
from ..request import ActionResult, CallResult, Failure, FailureKind, Outcome, Request, error_message
from .base import (
    UNAUTHORIZED, ConnectionLimits, DoorContext, FrontDoor, LimitedListener, PendingConnections, listening,
)

PROTOCOL = "openpi"
DEFAULT_PORT = 8000
SHUTDOWN_GRACE_S = 0.3
"""At shutdown, how long clients get to take their last replies, then to answer the closing handshake."""
CLOSE_TIMEOUT_S = 2.0
"""How long a client has to answer the closing handshake (idle timeout, refusals) before it is cut off."""

__all__ = ["OpenpiFrontDoor"]


@dataclass(eq=False)
class _Connection:
    client: str
    websocket: ServerConnection
    replies: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(maxsize=256))
    """Futures of the replies, in request order (bounded: a client that floods stops being read)."""
    prev_total_ms: float | None = None
    reader: asyncio.Task | None = None
    writer: asyncio.Task | None = None
    unsent_bytes: int = 0
    """Bytes of replies ready (or being sent) that the client has not taken yet."""
    in_flight: int = 0
    """Requests read and not yet answered on the wire."""


class OpenpiFrontDoor(FrontDoor):
    """Serve the server's policy to openpi ``WebsocketClientPolicy`` clients on ``ws://host:port``.

    ``host`` defaults to the server's; ``port=0`` picks a free port (see :attr:`port` after binding).
    ``key_map`` maps openpi keys to the policy's (default: see :mod:`~policyserve.wire.openpi_keys`).
    The server's ``api_token`` is required as openpi's client sends it: ``Authorization: Api-Key <token>``.
    With the server's ``tls_cert`` the door serves ``wss://`` (TLS).

    Connections are bounded (:class:`~policyserve.serving.doors.base.ConnectionLimits`): at most
    ``max_pending`` in their handshake (a new one drops the oldest) within ``open_timeout`` s, at most
    ``max_connections`` admitted (more get HTTP 503), closed after ``idle_timeout`` s without a message,
    and at most ``max_unsent_bytes`` of replies held for a client that does not read (its further requests
    are answered "server busy").
    """

    name = protocol = PROTOCOL

    def __init__(self, port: int = DEFAULT_PORT, host: str | None = None,
                 key_map: OpenpiKeyMap | None = None) -> None:
        self.requested_port, self.host = port, host
        self.key_map = key_map or OpenpiKeyMap()
        self.port: int | None = None
        self.mapping: OpenpiMapping | None = None
        self._ctx: DoorContext | None = None
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ws_server: Server | None = None
        self._connections: set[_Connection] = set()
        self._ids = itertools.count(1)
        self._metadata = b""
        self._reading = False
        self._limits = ConnectionLimits()
        self._pending = PendingConnections(self._limits.max_pending)
        self._ssl: ssl.SSLContext | None = None
        self._ws_logger = logging.getLogger(f"policyserve.openpi.{id(self)}")
        self.refused = 0
        """Connections refused at the handshake because ``max_connections`` were open."""
        self._admitting: set[ServerConnection] = set()
        """Connections past :meth:`_process_request` whose handler has not started yet."""

    @property
    def scheme(self) -> str:
        return "wss" if self._ssl is not None else "ws"

    # -- lifecycle (driven by PolicyServer) ------------------------------------------------------
    def bind(self, context: DoorContext) -> int:
        self._ctx = context
        self.host = self.host or context.host
        self.mapping = OpenpiMapping(self.key_map, context.modality_config, context.modality_dims)
        self._metadata = openpi_codec.packb(self.mapping.metadata())
        self._limits = context.connections
        self._pending = PendingConnections(self._limits.max_pending)
        self._ssl = tls_context(context.tls_cert, context.tls_key) if context.tls_cert else None
        self._ws_logger.propagate = False  # websockets' own per-connection lines: rate-limited, see _WsLog
        self._ws_logger.handlers[:] = [_WsLog(context.verbose)]
        host = "" if self.host in ("0.0.0.0", "*") else self.host
        with listening(f"{self.scheme}://{self.host}:{self.requested_port}", self.host, self.requested_port):
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.create_server((host, self.requested_port), family=family, backlog=1024)
            self._sock = LimitedListener.wrap(sock, self._pending)
        self.port = self._sock.getsockname()[1]
        return self.port

    def start(self) -> None:
        assert self._sock is not None, "bind() first"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name=f"policyserve-openpi-{self.port}", daemon=True)
        self._thread.start()
        self._call(self._open(), 10.0)
        if self._ctx is not None and self._ctx.verbose:
            print(f"openpi clients: listening on {self.scheme}://{self.host}:{self.port}", flush=True)

    def _run_loop(self) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        self._loop.set_exception_handler(self._loop_error)
        self._loop.run_forever()

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        """asyncio's own errors (e.g. accept() out of descriptors): one line per kind per second, no traceback."""
        if self._ctx is not None and self._ctx.verbose:
            exc = context.get("exception")
            kind = type(exc).__name__ if exc is not None else "error"
            SERVER_LOG.error(f"openpi-loop-{kind}", f"openpi door: {context.get('message', 'error')}"
                      + (f": {error_message(exc)}" if exc is not None else ""))

    def _call(self, coroutine: Any, timeout: float) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    async def _open(self) -> None:
        assert self._ctx is not None
        limits = self._limits
        self._ws_server = await serve(
            self._handle, sock=self._sock, compression=None, max_size=self._ctx.hard_limit_bytes,
            process_request=self._process_request, open_timeout=limits.open_timeout, ssl=self._ssl,
            close_timeout=CLOSE_TIMEOUT_S, logger=self._ws_logger,
        )
        self._reading = True

    def stop_reading(self) -> None:
        if self._loop is None or not self._loop.is_running():
            return
        try:
            self._call(self._stop_reading(), 5.0)
        except (TimeoutError, RuntimeError):
            pass

    async def _stop_reading(self) -> None:
        self._reading = False
        if self._ws_server is not None:
            self._ws_server.server.close()  # stop accepting; open connections stay for their replies
        for connection in list(self._connections):
            if connection.reader is not None:
                connection.reader.cancel()  # cancelling recv() loses no data

    def close(self, timeout: float) -> None:
        if self._loop is not None and self._loop.is_running():
            try:
                self._call(self._close(timeout), timeout + 5.0)
            except (TimeoutError, RuntimeError):
                pass
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(5.0)
        if self._loop is not None and not self._loop.is_running():
            self._loop.close()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def _close(self, timeout: float) -> None:
        await self._stop_reading()
        if self._ws_server is None:
            return
        # Handlers send what the scheduler has answered, then return; then the connections close. A client
        # that does not take its replies (or answer the closing handshake) within the grace is cut off.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        progress = None
        while loop.time() < deadline:
            writers = [c.writer for c in self._connections if c.writer is not None and not c.writer.done()]
            state = (len(writers), sum(c.unsent_bytes + c.in_flight for c in self._connections))
            if not writers or state == progress:  # done, or nothing moved for a whole grace period
                break
            progress = state
            await asyncio.wait(writers, timeout=min(SHUTDOWN_GRACE_S, max(0.0, deadline - loop.time())))
        for connection in list(self._connections):
            if connection.writer is not None and not connection.writer.done():
                connection.writer.cancel()  # a client not reading, or a reply that never came
        self._ws_server.close(close_connections=True)
        try:
            await asyncio.wait_for(asyncio.shield(self._ws_server.wait_closed()), SHUTDOWN_GRACE_S)
        except TimeoutError:
            for websocket in list(self._ws_server.all_connections):
                websocket.transport.abort()  # never answered the closing handshake
            try:
                await asyncio.wait_for(self._ws_server.wait_closed(), 1.0)
            except TimeoutError:
                pass
        # Nothing of this door may outlive its loop ("Task was destroyed but it is pending").
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)

    # -- handshake -------------------------------------------------------------------------------
    def _process_request(self, connection: ServerConnection, request: HttpRequest) -> HttpResponse | None:
        if request.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        ctx = self._ctx
        assert ctx is not None
        if ctx.api_token is not None:
            scheme, _, key = request.headers.get("Authorization", "").partition(" ")
            if scheme != "Api-Key" or not ctx.authorized(key.strip()):
                ctx.listener.unauthorized(PROTOCOL)
                return connection.respond(http.HTTPStatus.UNAUTHORIZED, UNAUTHORIZED + "\n")
        self._admitting = {w for w in self._admitting if not w.transport.is_closing()}
        if len(self._connections) + len(self._admitting) >= self._limits.max_connections:
            self.refused += 1
            if ctx.verbose:
                SERVER_LOG.error("openpi-full", f"openpi door: refused a connection, {self._limits.max_connections} "
                                         "open (max_connections)")
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE,
                                      f"server busy: {self._limits.max_connections} connections open "
                                      "(max_connections)\n")
        self._admitting.add(connection)  # counted until its handler starts (or its handshake fails)
        sock = connection.transport.get_extra_info("socket")
        self._pending.admitted(sock.fileno() if sock is not None else None)
        return None

    # -- connections -----------------------------------------------------------------------------
    async def _handle(self, websocket: ServerConnection) -> None:
        self._admitting.discard(websocket)
        connection = _Connection(f"openpi-{next(self._ids)}", websocket)
        self._connections.add(connection)
        writer = connection.writer = asyncio.create_task(self._write(connection))
        try:
            await websocket.send(self._metadata)
            connection.reader = asyncio.create_task(self._read(connection))
            if not self._reading:
                connection.reader.cancel()
            await asyncio.wait([connection.reader])
        except websockets.ConnectionClosed:
            pass
        finally:
            while not writer.done():  # the writer ends after the replies queued before this marker
                try:
                    connection.replies.put_nowait(None)
                    break
                except asyncio.QueueFull:
                    await asyncio.sleep(0.01)
            await asyncio.wait([writer])
            self._connections.discard(connection)

    async def _read(self, connection: _Connection) -> None:
        loop = asyncio.get_running_loop()
        idle = self._limits.idle_timeout
        try:
            while self._reading:
                try:  # recv() is the only point where stop_reading cancels; cancelling it loses no data
                    async with asyncio.timeout(idle if idle > 0 else None):
                        message = await connection.websocket.recv()
                except TimeoutError:
                    if connection.in_flight:
                        continue  # waiting for its replies is not idling
                    await connection.websocket.close(1000, f"idle for {idle:g} s (idle_timeout)")
                    return
                future = loop.create_future()
                connection.in_flight += 1
                self._dispatch(connection, message, time.perf_counter(), future, loop)
                await asyncio.shield(connection.replies.put(future))
        except websockets.ConnectionClosed:
            pass

    async def _write(self, connection: _Connection) -> None:
        while True:
            future = await connection.replies.get()
            if future is None:
                return
            frame, received = await future
            try:
                await connection.websocket.send(frame)
            except websockets.ConnectionClosed:
                continue  # drain the rest; nothing more can be sent
            finally:
                connection.unsent_bytes -= len(frame)
                connection.in_flight -= 1
            if isinstance(frame, bytes) and received is not None:
                connection.prev_total_ms = (time.perf_counter() - received) * 1000

    def _dispatch(self, connection: _Connection, message: Any, received: float, future: asyncio.Future,
                  loop: asyncio.AbstractEventLoop) -> None:
        """Decode, map and submit one message; ``future`` gets (frame to send, received time)."""
        ctx = self._ctx
        assert ctx is not None and self.mapping is not None
        endpoint = "get_action"
        try:
            if connection.unsent_bytes > self._limits.max_unsent_bytes:  # before any work: a client not reading
                future.set_result((unread_busy(connection.unsent_bytes, self._limits.max_unsent_bytes), None))
                _settled(connection, future)
                return
            if isinstance(message, str):
                raise ProtocolError("expected a binary msgpack-numpy frame, got a text frame")
            ctx.check_size(len(message))
            stats = DecodeStats()
            obs = openpi_codec.unpackb(message, stats=stats)
            nbytes = max(len(message), stats.decoded_bytes)  # the queue's byte limit counts what decoding built
            if isinstance(obs, dict) and "__ctrl__" in obs:
                endpoint = "reset"
                self._control(connection, obs, nbytes, received, future, loop)
                return
            observation = self.mapping.observation(obs)
            reply = self._replier(connection, future, loop, received, self._action_frame)
            ctx.submit(Request(connection.client, "get_action", {"observation": observation, "options": None},
                               reply, nbytes=nbytes, protocol=PROTOCOL, received=received))
        except Exception as exc:  # noqa: BLE001 - answered as a text frame, the connection stays usable
            failure = Failure.from_exception(exc)
            if failure.kind not in (FailureKind.BUSY, FailureKind.SHUTTING_DOWN):
                ctx.listener.invalid(PROTOCOL, endpoint)
                if ctx.verbose:
                    SERVER_LOG.error("openpi-invalid", f"Error in openpi request: {error_message(exc)}")
            if not future.done():
                future.set_result((failure.message, None))
                _settled(connection, future)

    def _control(self, connection: _Connection, obs: dict, nbytes: int, received: float, future: asyncio.Future,
                 loop: asyncio.AbstractEventLoop) -> None:
        control = obs["__ctrl__"]
        if control != "episode_start":
            future.set_result((openpi_codec.packb({"__ack__": "episode_end" if control == "episode_end"
                                                   else "ignored"}), None))
            _settled(connection, future)
            return
        reply = self._replier(connection, future, loop, received, self._reset_frame)
        assert self._ctx is not None
        self._ctx.submit(Request(connection.client, "reset", {"options": None}, reply, nbytes=nbytes,
                                 protocol=PROTOCOL, received=received))

    def _replier(self, connection: _Connection, future: asyncio.Future, loop: asyncio.AbstractEventLoop,
                 received: float, encode: Callable[[Any, _Connection], bytes]) -> Callable[[Outcome], None]:
        """Reply callback run on a scheduler worker: encodes there, hands the frame to the loop. A failure
        becomes one text frame (what openpi's client raises)."""

        def reply(outcome: Outcome) -> None:
            if isinstance(outcome, Failure):
                frame: bytes | str = outcome.message
            else:
                try:
                    frame = encode(outcome, connection)
                except Exception as exc:  # noqa: BLE001 - e.g. the policy's action lacks a mapped key
                    frame = error_message(exc)
            try:
                loop.call_soon_threadsafe(_resolve, connection, future, (frame, received))
            except RuntimeError:
                pass  # the door's loop has stopped: nobody is left to answer

        return reply

    def _action_frame(self, outcome: ActionResult, connection: _Connection) -> bytes:
        """openpi's action map: the mapped actions and ``server_timing`` (the policy's own entries, the
        server's timing, ``infer_ms`` as openpi names the policy time, ``prev_total_ms``)."""
        assert self.mapping is not None
        reply: dict[str, Any] = self.mapping.actions_reply(outcome.action)
        t = outcome.timing
        timing = {**outcome.info.get("server_timing", {}), "queue_ms": t.queue_ms, "policy_ms": t.policy_ms,
                  "merged_requests": t.merged_requests, "recv_to_reply_ms": t.recv_to_reply_ms,
                  "infer_ms": t.policy_ms}
        if connection.prev_total_ms is not None:
            timing["prev_total_ms"] = connection.prev_total_ms
        reply["server_timing"] = timing
        return openpi_codec.packb(reply)

    @staticmethod
    def _reset_frame(outcome: CallResult, connection: _Connection) -> bytes:
        return openpi_codec.packb({"__ack__": "episode_start"})


def _resolve(connection: _Connection, future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)
        _settled(connection, future)


def _settled(connection: _Connection, future: asyncio.Future) -> None:
    """Count a reply that is ready as unsent until the writer has handed it to the connection."""
    connection.unsent_bytes += len(future.result()[0])


def unread_busy(unsent: int, limit: int) -> str:
    return (f"server busy: {unsent} bytes of replies to this connection are not read yet "
            f"(max_unsent_bytes={limit}); read them before sending more requests")


def tls_context(cert: str, key: str | None) -> ssl.SSLContext:
    """The server-side TLS context of ``cert`` (PEM chain) and ``key``; :class:`ConfigError` naming
    ``tls_cert`` or ``tls_key`` when they cannot be loaded."""
    for field, path in (("tls_cert", cert), ("tls_key", key)):
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"tls_cert and tls_key must be PEM files; {field} {path} is not a file")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"tls_cert {cert} and tls_key {key or cert} cannot be loaded as a PEM certificate and its "
                          f"private key: {getattr(exc, 'reason', None) or exc.strerror or exc}") from None
    return context


class _WsLog(logging.Handler):
    """websockets' log lines of this door: warnings and errors only, one per kind per second, no traceback."""

    def __init__(self, verbose: bool) -> None:
        super().__init__(logging.WARNING)
        self.verbose = verbose

    def emit(self, record: logging.LogRecord) -> None:
        if not self.verbose:
            return
        exc = record.exc_info[1] if record.exc_info else None
        message = record.getMessage() + (f": {error_message(exc)}" if exc is not None else "")
        SERVER_LOG.error(f"openpi-ws-{record.msg}", f"openpi door: {message}")
