"""Policy client for GR00T-protocol servers (ours or NVIDIA's), with timeouts that work.

Lazy-pirate pattern: each request waits at most ``timeout_ms`` for the reply; on timeout the REQ
socket is discarded (LINGER 0) and a fresh one is made, so the next call works and closing the
client never blocks the process.
"""

from __future__ import annotations

from typing import Any

import zmq

from ..errors import ConfigError, PolicyTimeoutError, ProtocolError, ServerError, UnauthorizedError
from ..policies.base import Action, BasePolicy, Info, Observation
from ..registry import parse_modality_configs
from ..types import ModalityConfigs
from ..wire.gr00t import packb, unpackb

LEGACY_ERROR_REPLY = b"ERROR"


class PolicyClient(BasePolicy):
    """Talks to a policy server; usable anywhere a :class:`BasePolicy` is expected.

    With ``strict=True`` observations and actions are checked locally against the server's
    modality config (fetched once).
    """

    def __init__(
        self,
        host: str = "localhost",
        port: int = 5555,
        timeout_ms: int = 15000,
        api_token: str | None = None,
        strict: bool = False,
    ) -> None:
        super().__init__(strict=strict)
        self.host, self.port = host, port
        self.timeout_ms = timeout_ms
        self.api_token = api_token
        self._context = zmq.Context()
        self._socket: zmq.Socket | None = None
        self._modality_config: ModalityConfigs | None = None
        self._init_socket()

    @property
    def address(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    def _init_socket(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
        sock = self._context.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.address)
        self._socket = sock

    # -- transport -------------------------------------------------------------------------------
    def send_request(self, request: dict[str, Any], timeout_ms: int | None = None) -> Any:
        """Send one raw request map and return the decoded reply (no error interpretation)."""
        if self._socket is None:
            raise RuntimeError("PolicyClient is closed")
        timeout = self.timeout_ms if timeout_ms is None else timeout_ms
        payload = packb(request)
        try:
            if not self._socket.poll(timeout, zmq.POLLOUT):
                raise zmq.Again()
            self._socket.send(payload, zmq.NOBLOCK, copy=False)
            if not self._socket.poll(timeout, zmq.POLLIN):
                raise zmq.Again()
            reply = self._socket.recv(zmq.NOBLOCK, copy=False)
        except (zmq.Again, KeyboardInterrupt) as exc:
            self._init_socket()  # a REQ socket waiting for a lost reply is unusable: replace it
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise PolicyTimeoutError(
                f"no reply from {self.address} to {request.get('endpoint', 'get_action')!r} within {timeout} ms "
                "(is the server running, and is the message under its size limit?)"
            ) from None
        except zmq.ZMQError:
            self._init_socket()
            raise
        if len(reply) == len(LEGACY_ERROR_REPLY) and reply.bytes == LEGACY_ERROR_REPLY:
            raise ServerError("Server error. Make sure we are running the correct policy server.")
        try:
            return unpackb(reply.buffer, writable=True)
        except ProtocolError as exc:
            raise ProtocolError(f"could not decode reply from {self.address}: {exc}") from exc

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
            message = str(result["error"])
            cls = UnauthorizedError if message.startswith("Unauthorized") else ServerError
            raise cls(message, endpoint)
        return result

    # -- endpoints -------------------------------------------------------------------------------
    def ping(self) -> bool:
        """True if a server answers within ``timeout_ms``; False (never a hang) otherwise."""
        try:
            self.call_endpoint("ping", requires_input=False)
            return True
        except (PolicyTimeoutError, zmq.ZMQError, ProtocolError):
            return False

    def get_modality_config(self) -> ModalityConfigs:
        """The server's ``{modality: ModalityConfig}``, fetched and parsed once.

        Raises :class:`ProtocolError` when the reply is not a config of the four modalities.
        """
        if self._modality_config is None:
            reply = self.call_endpoint("get_modality_config", requires_input=False)
            try:
                self._modality_config = parse_modality_configs(reply, f"modality config from {self.address}")
            except ConfigError as exc:
                raise ProtocolError(str(exc)) from exc
        return dict(self._modality_config)

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
