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
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import websockets
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request as HttpRequest
from websockets.http11 import Response as HttpResponse

from ...errors import ProtocolError
from ...wire import openpi as openpi_codec
from ...wire.openpi_keys import OpenpiKeyMap, OpenpiMapping
from ..request import ActionResult, CallResult, Failure, FailureKind, Outcome, Request, error_message
from .base import UNAUTHORIZED, DoorContext, FrontDoor, listening

PROTOCOL = "openpi"
DEFAULT_PORT = 8000

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


class OpenpiFrontDoor(FrontDoor):
    """Serve the server's policy to openpi ``WebsocketClientPolicy`` clients on ``ws://host:port``.

    ``host`` defaults to the server's; ``port=0`` picks a free port (see :attr:`port` after binding).
    ``key_map`` maps openpi keys to the policy's (default: see :mod:`~policyserve.wire.openpi_keys`).
    The server's ``api_token`` is required as openpi's client sends it: ``Authorization: Api-Key <token>``.
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

    # -- lifecycle (driven by PolicyServer) ------------------------------------------------------
    def bind(self, context: DoorContext) -> int:
        self._ctx = context
        self.host = self.host or context.host
        self.mapping = OpenpiMapping(self.key_map, context.modality_config, context.modality_dims)
        self._metadata = openpi_codec.packb(self.mapping.metadata())
        host = "" if self.host in ("0.0.0.0", "*") else self.host
        with listening(f"ws://{self.host}:{self.requested_port}", self.host, self.requested_port):
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self._sock = socket.create_server((host, self.requested_port), family=family)
        self.port = self._sock.getsockname()[1]
        return self.port

    def start(self) -> None:
        assert self._sock is not None, "bind() first"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name=f"policyserve-openpi-{self.port}", daemon=True)
        self._thread.start()
        self._call(self._open(), 10.0)
        if self._ctx is not None and self._ctx.verbose:
            print(f"openpi clients: listening on ws://{self.host}:{self.port}", flush=True)

    def _run_loop(self) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _call(self, coroutine: Any, timeout: float) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    async def _open(self) -> None:
        assert self._ctx is not None
        self._ws_server = await serve(
            self._handle, sock=self._sock, compression=None, max_size=self._ctx.hard_limit_bytes,
            process_request=self._process_request,
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
        # Handlers send what the scheduler has answered, then return; then the connections close.
        if self._ws_server.handler_tasks:
            await asyncio.wait(self._ws_server.handler_tasks, timeout=timeout)
        for connection in list(self._connections):
            if connection.writer is not None:
                connection.writer.cancel()  # a reply that never came (a call still running past the timeout)
        self._ws_server.close(close_connections=True)
        try:
            await asyncio.wait_for(self._ws_server.wait_closed(), timeout)
        except TimeoutError:
            pass

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
        return None

    # -- connections -----------------------------------------------------------------------------
    async def _handle(self, websocket: ServerConnection) -> None:
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
        try:
            while self._reading:
                message = await connection.websocket.recv()  # the only point where stop_reading cancels
                future = loop.create_future()
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
            if isinstance(frame, bytes) and received is not None:
                connection.prev_total_ms = (time.perf_counter() - received) * 1000

    def _dispatch(self, connection: _Connection, message: Any, received: float, future: asyncio.Future,
                  loop: asyncio.AbstractEventLoop) -> None:
        """Decode, map and submit one message; ``future`` gets (frame to send, received time)."""
        ctx = self._ctx
        assert ctx is not None and self.mapping is not None
        endpoint = "get_action"
        try:
            if isinstance(message, str):
                raise ProtocolError("expected a binary msgpack-numpy frame, got a text frame")
            ctx.check_size(len(message))
            obs = openpi_codec.unpackb(message)
            if isinstance(obs, dict) and "__ctrl__" in obs:
                endpoint = "reset"
                self._control(connection, obs, len(message), received, future, loop)
                return
            observation = self.mapping.observation(obs)
            reply = self._replier(connection, future, loop, received, self._action_frame)
            ctx.submit(Request(connection.client, "get_action", {"observation": observation, "options": None},
                               reply, nbytes=len(message), protocol=PROTOCOL, received=received))
        except Exception as exc:  # noqa: BLE001 - answered as a text frame, the connection stays usable
            failure = Failure.from_exception(exc)
            if failure.kind not in (FailureKind.BUSY, FailureKind.SHUTTING_DOWN):
                ctx.listener.invalid(PROTOCOL, endpoint)
                if ctx.verbose:
                    print(f"Error in openpi request: {error_message(exc)}", flush=True)
            future.set_result((failure.message, None))

    def _control(self, connection: _Connection, obs: dict, nbytes: int, received: float, future: asyncio.Future,
                 loop: asyncio.AbstractEventLoop) -> None:
        control = obs["__ctrl__"]
        if control != "episode_start":
            future.set_result((openpi_codec.packb({"__ack__": "episode_end" if control == "episode_end"
                                                   else "ignored"}), None))
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
                loop.call_soon_threadsafe(_resolve, future, (frame, received))
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


def _resolve(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)
