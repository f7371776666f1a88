"""Policy client for GR00T-protocol servers (ours or NVIDIA's), with timeouts that work.

Lazy-pirate pattern: each request waits at most ``timeout_ms`` for the reply, decoding included;
on timeout the REQ socket is discarded (LINGER 0) and a fresh one is made, so the next call works
and closing the client never blocks the process. Every socket a client makes carries the same
ZeroMQ routing id, so a server keeps its per-client state (a replay cursor, a scripted expert)
across those reconnects, and asks for request ids (``REQ_CORRELATE``) so a late reply to a
timed-out request is dropped instead of answering the next one.

Replies are bounded: ``max_reply_bytes`` on the wire (ZeroMQ drops a larger message) and the
codec's decode budget once received.
"""

from __future__ import annotations

import os
import secrets
import time
from typing import Any

import zmq

from ..errors import ConfigError, PolicyTimeoutError, ProtocolError, ServerError, UnauthorizedError
from ..policies.base import Action, BasePolicy, Info, Observation
from ..types import ModalityConfig, ModalityConfigs
from ..wire.gr00t import _clip, packb, unpackb

LEGACY_ERROR_REPLY = b"ERROR"
REQUEST_IDS = True
"""Whether sockets send ZeroMQ request ids (``REQ_CORRELATE``): needs a server that echoes the whole envelope."""
DEFAULT_MAX_REPLY_BYTES = 256 << 20
"""Largest reply a client accepts unless told otherwise (256 MiB)."""


class PolicyClient(BasePolicy):
    """Talks to a policy server; usable anywhere a :class:`BasePolicy` is expected.

    With ``strict=True`` observations and actions are checked locally against the server's
    modality config (fetched once).

    ``max_reply_bytes`` bounds a reply's size (a larger one is dropped by ZeroMQ and the call times
    out); ``curve_server_key`` (the server's public key: z85 text or a key file) turns on CurveZMQ
    encryption, with ``curve_key_pair`` (a ``.key_secret`` file or a (public, secret) z85 pair) as
    this client's keys, for servers that admit only authorized clients. ``identity`` fixes the
    routing id (default: random, one per client, kept across reconnects).
    """

    def __init__(
        self,
        host: str = "localhost",
        port: int = 5555,
        timeout_ms: int = 15000,
        api_token: str | None = None,
        strict: bool = False,
        *,
        max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES,
        curve_server_key: str | bytes | os.PathLike | None = None,
        curve_key_pair: str | bytes | os.PathLike | tuple[str | bytes, str | bytes] | None = None,
        identity: bytes | None = None,
    ) -> None:
        super().__init__(strict=strict)
        if max_reply_bytes <= 0:
            raise ConfigError(f"max_reply_bytes must be positive, got {max_reply_bytes}")
        if curve_key_pair is not None and curve_server_key is None:
            raise ConfigError("curve_key_pair needs curve_server_key (the server's public key)")
        if identity is not None and not (1 <= len(identity) <= 255 and identity[:1] != b"\0"):
            raise ConfigError("identity must be 1 to 255 bytes, not starting with a zero byte")
        self.host, self.port = host, port
        self.timeout_ms = timeout_ms
        self.api_token = api_token
        self.max_reply_bytes = max_reply_bytes
        self.identity = identity or b"policyserve-" + secrets.token_hex(8).encode()
        self._curve = None
        if curve_server_key is not None:
            from ..security import CurveClientKeys

            self._curve = CurveClientKeys.load(curve_server_key, curve_key_pair)
        self._context = zmq.Context()
        self._socket: zmq.Socket | None = None
        self._modality_config: ModalityConfigs | None = None
        self._capabilities: frozenset[str] | None = None
        self._init_socket()

    @property
    def address(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    def _init_socket(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
        sock = self._context.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, self.identity)
        if REQUEST_IDS:
            sock.setsockopt(zmq.REQ_CORRELATE, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_reply_bytes)
        if self._curve is not None:
            self._curve.apply(sock)
        sock.connect(self.address)
        self._socket = sock

    # -- transport -------------------------------------------------------------------------------
    def send_request(self, request: dict[str, Any], timeout_ms: int | None = None) -> Any:
        """Send one raw request map and return the decoded reply (no error interpretation)."""
        if self._socket is None:
            raise RuntimeError("PolicyClient is closed")
        timeout = self.timeout_ms if timeout_ms is None else timeout_ms
        deadline = time.monotonic() + timeout / 1000
        payload = packb(request)
        try:
            if not self._socket.poll(timeout, zmq.POLLOUT):
                raise zmq.Again()
            self._socket.send(payload, zmq.NOBLOCK, copy=False)
            reply = self._receive(deadline)
        except (zmq.Again, KeyboardInterrupt) as exc:
            self._init_socket()  # a REQ socket waiting for a lost reply is unusable: replace it
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise PolicyTimeoutError(
                f"no reply from {self.address} to {_clip(repr(request.get('endpoint', 'get_action')))} within "
                f"{timeout} ms (is the server running, is the message under its size limit, is the reply under "
                f"max_reply_bytes={self.max_reply_bytes}{', and are the CURVE keys right' if self._curve else ''}?)"
            ) from None
        except zmq.ZMQError:
            self._init_socket()
            raise
        if len(reply) > self.max_reply_bytes:
            raise ProtocolError(f"reply from {self.address} of {len(reply)} bytes exceeds "
                                f"max_reply_bytes={self.max_reply_bytes}")
        if len(reply) == len(LEGACY_ERROR_REPLY) and reply.bytes == LEGACY_ERROR_REPLY:
            raise ServerError("Server error. Make sure we are running the correct policy server.")
        try:
            return unpackb(reply.buffer, writable=True, deadline=deadline)
        except ProtocolError as exc:
            raise ProtocolError(f"could not decode reply from {self.address}: {exc}") from None

    def _receive(self, deadline: float) -> zmq.Frame:
        """The reply to the request just sent; :class:`zmq.Again` once ``deadline`` passes."""
        assert self._socket is not None
        while True:
            if not self._socket.poll(max(0, int((deadline - time.monotonic()) * 1000)), zmq.POLLIN):
                raise zmq.Again()
            try:
                return self._socket.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                # poll saw a late reply to an earlier, timed-out request, which the socket then dropped
                # (its request id is not ours): keep waiting for ours
                if time.monotonic() >= deadline:
                    raise

    def call_endpoint(
        self, endpoint: str, data: dict[str, Any] | None = None, requires_input: bool = True
    ) -> Any:
        """Call ``endpoint`` (with ``data`` as keyword arguments) and return its result.

        Raises :class:`ServerError` (or :class:`UnauthorizedError`) when the server answers an error,
        :class:`PolicyTimeoutError` when it does not answer in time.
        """
        request: dict[str, Any] = {"endpoint": endpoint}
        if requires_input:
            request["data"] = data
        if self.api_token:
            request["api_token"] = self.api_token
        result = self.send_request(request)
        if isinstance(result, dict) and "error" in result and len(result) == 1:
            message = _clip(str(result["error"]), 2000)
            cls = UnauthorizedError if message.startswith("Unauthorized") else ServerError
            raise cls(message, endpoint)
        return result

    # -- endpoints -------------------------------------------------------------------------------
    def ping(self) -> bool:
        """True if a server answers a ping within ``timeout_ms``; False on any failure (never a hang)."""
        try:
            self.call_endpoint("ping", requires_input=False)
            return True
        except Exception:  # noqa: BLE001 - any failure (timeout, error reply, bad reply, closed) means "no"
            return False

    def get_modality_config(self) -> ModalityConfigs:
        """The server's ``{modality: ModalityConfig}`` as it declares them, fetched and parsed once.

        Whatever subset of modalities the server declares is returned (GR00T's server answers ``{}``
        for a policy without modality configs). Raises :class:`ProtocolError` when the reply is not
        a map of modality name to config.
        """
        if self._modality_config is None:
            reply = self.call_endpoint("get_modality_config", requires_input=False)
            self._modality_config = _parse_declared_configs(reply, self.address)
        return dict(self._modality_config)

    @property
    def capabilities(self) -> frozenset[str]:  # type: ignore[override]
        """What the server's policy can do beyond a plain ``get_action`` (e.g. ``"rtc"``), asked once.

        A server without the ``get_capabilities`` endpoint (GR00T's own) answers "Unknown endpoint": none.
        """
        if self._capabilities is None:
            try:
                reply = self.call_endpoint("get_capabilities", requires_input=False)
            except ServerError as exc:
                if "Unknown endpoint" not in exc.message:
                    raise
                reply = []
            if not isinstance(reply, (list, tuple)) or not all(isinstance(c, str) for c in reply):
                raise ProtocolError(f"get_capabilities reply from {self.address} must be a list of names, "
                                    f"got {_clip(repr(reply))}")
            self._capabilities = frozenset(reply)
        return self._capabilities

    def check_options(self, options: dict | None, batch_size: int | None = None) -> None:
        """Nothing: the server checks the options (and refuses what its policy cannot do)."""

    def _get_action(self, observation: Observation, options: dict | None = None) -> tuple[Action, Info]:
        reply = self.call_endpoint("get_action", {"observation": observation, "options": options})
        if not isinstance(reply, (list, tuple)) or len(reply) != 2:
            raise ProtocolError(f"get_action reply must be [action, info], got {type(reply).__name__}")
        return reply[0], reply[1]

    def reset(self, options: dict | None = None) -> Info:
        return self.call_endpoint("reset", {"options": options})

    def kill_server(self) -> None:
        self.call_endpoint("kill", requires_input=False)

    # -- cleanup ---------------------------------------------------------------------------------
    def close(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        if not self._context.closed:
            self._context.term()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass


def _parse_declared_configs(reply: Any, address: str) -> ModalityConfigs:
    """``{modality: ModalityConfig}`` from a ``get_modality_config`` reply, any subset of modalities."""
    if not isinstance(reply, dict):
        raise ProtocolError(f"modality config from {address}: expected a map of modality to config, "
                            f"got {type(reply).__name__}")
    configs: ModalityConfigs = {}
    for modality, entry in reply.items():
        if isinstance(entry, ModalityConfig):
            configs[modality] = entry
            continue
        try:
            configs[modality] = ModalityConfig.from_json(entry)
        except (TypeError, ValueError, AttributeError) as exc:
            raise ProtocolError(f"modality config from {address}: modality {_clip(repr(modality))}: "
                                f"{_clip(str(exc))}") from None
    return configs
