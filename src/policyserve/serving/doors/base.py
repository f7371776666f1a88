"""The door interface, the :class:`DoorContext` a door serves with, and the checks every door shares.

A door owns one listening port and one wire protocol (or, for metrics, an HTTP exporter). The
:class:`~policyserve.serving.server.PolicyServer` binds, starts and stops its doors; a door sees the rest
of the server only through its :class:`DoorContext`: where to submit requests, where to report events,
the served modality config and dims, the limits and the token. Listening (with the port-in-use error),
the constant-time token check and the message-size check are written here once, for every door.
"""

from __future__ import annotations

import errno
import hmac
import resource
import socket
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from ...errors import ConfigError, ProtocolError
from ...types import ModalityConfigs, ModalityDims
from ..events import SchedulerListener
from ..request import Request

UNAUTHORIZED = "Unauthorized: Invalid API token"

__all__ = ["UNAUTHORIZED", "AddressInUseError", "ConnectionLimits", "DoorContext", "FrontDoor", "LimitedListener",
           "PendingConnections", "listening", "raise_open_file_limit"]


class AddressInUseError(ConfigError):
    """A door's port is taken."""


@dataclass(frozen=True)
class ConnectionLimits:
    """How many connections a door keeps and for how long (from the server's config)."""

    max_connections: int = 1024
    """Most admitted connections (openpi: more get HTTP 503 at the handshake)."""
    max_pending: int = 256
    """Most connections still in their handshake; a new one past it drops the oldest."""
    open_timeout: float = 10.0
    """Seconds to finish the handshake (TLS included)."""
    idle_timeout: float = 600.0
    """Seconds a connection may send nothing with no request in flight before it is closed; 0: never."""
    max_unsent_bytes: int = 64 << 20
    """Replies (bytes) held for one client (openpi or GR00T) that does not read; past it its requests get
    "server busy"."""


@dataclass(frozen=True)
class DoorContext:
    """What a door serves with (given to :meth:`FrontDoor.bind`)."""

    submit: Callable[[Request], None]
    """Queue a request with the scheduler; raises ``ServerBusyError`` at once when it is refused."""
    listener: SchedulerListener
    """Where the door reports events (invalid requests, refused tokens)."""
    modality_config: ModalityConfigs
    """The served policy's modality config."""
    modality_dims: ModalityDims
    """The served policy's declared sizes."""
    host: str
    """The address doors listen on unless a door is given its own."""
    api_token: str | None
    """Token every request (GR00T) or connection (openpi) must carry; None: no check. See :meth:`authorized`."""
    max_message_bytes: int
    """Largest message answered; larger ones get an error (see :meth:`check_size`)."""
    hard_limit_bytes: int
    """Largest message a transport may read at all; larger ones are dropped before being allocated."""
    verbose: bool
    """Print the door's address and its errors."""
    protocols: tuple[str, ...] = ()
    """Every protocol the server's doors speak (e.g. ``("gr00t", "openpi")``)."""
    request_stop: Callable[[], None] = lambda: None
    """Ask the server to shut down (GR00T's ``kill`` endpoint)."""
    replicas: Callable[[], float] = lambda: 1.0
    """Policy replicas serving now."""
    capabilities: frozenset[str] = frozenset()
    """What the served policy can do beyond a plain ``get_action`` (e.g. ``"rtc"``)."""
    curve_secret_key: str | None = None
    """CurveZMQ secret key file for ZeroMQ doors (see :func:`policyserve.security.curve_server`); None: plain."""
    curve_authorized_keys: str | None = None
    """Folder of admitted client public keys for CurveZMQ; None: any client that knows the server's key."""
    connections: ConnectionLimits = field(default_factory=lambda: ConnectionLimits())
    """Connection limits and timeouts of the doors (see :class:`ConnectionLimits`)."""
    tls_cert: str | None = None
    """PEM certificate file: websocket doors serve TLS (``wss://``); None: plain."""
    tls_key: str | None = None
    """PEM private key file of ``tls_cert`` (None: in ``tls_cert``)."""
    metrics_token: str | None = None
    """Token the metrics endpoint requires (``Authorization: Bearer``); None: none."""
    check_room: Callable[[Request], None] = lambda request: None
    """Raise ``ServerBusyError`` if the request's client has no room in its queue (asked before decoding)."""

    def authorized(self, token: object) -> bool:
        """True when no token is required or ``token`` equals it (compared in constant time)."""
        if self.api_token is None:
            return True
        if not isinstance(token, str):
            return False
        return hmac.compare_digest(token.encode(), self.api_token.encode())

    def check_size(self, nbytes: int) -> None:
        """:class:`~policyserve.errors.ProtocolError` naming ``max_message_bytes`` for a message over it."""
        if nbytes > self.max_message_bytes:
            raise ProtocolError(
                f"message of {nbytes} bytes exceeds the server's max_message_bytes={self.max_message_bytes}")


@contextmanager
def listening(url: str, host: str, port: int) -> Iterator[None]:
    """Open a listening port inside this block: a taken port raises :class:`AddressInUseError`, any other
    failure to listen a :class:`~policyserve.errors.ConfigError` naming ``url``."""
    try:
        yield
    except Exception as exc:
        if getattr(exc, "errno", None) == errno.EADDRINUSE:
            raise AddressInUseError(f"port {port} on {host} is in use") from None
        if isinstance(exc, OSError) or isinstance(getattr(exc, "errno", None), int):
            raise ConfigError(f"cannot listen on {url}: {exc}") from None
        raise


class FrontDoor(ABC):
    """Lifecycle the server drives: :meth:`bind` (open the port), :meth:`start` (once the scheduler runs),
    :meth:`stop_reading` (first step of shutdown, before the scheduler answers what is queued) and
    :meth:`close` (after the scheduler has answered everything). A door that is also a
    :class:`~policyserve.serving.events.SchedulerListener` receives the server's events."""

    name: str = "front door"
    protocol: str | None = None
    """The client protocol the door speaks (``Request.protocol`` of what it submits), if any."""
    port: int | None = None
    """The bound port (after :meth:`bind`)."""

    @abstractmethod
    def bind(self, context: DoorContext) -> int:
        """Open the port (raising :class:`AddressInUseError` when taken); returns it."""

    @abstractmethod
    def start(self) -> None:
        """Accept clients (returns once listening)."""

    def stop_reading(self) -> None:
        """Take no new connections or requests; replies still go out."""

    @abstractmethod
    def close(self, timeout: float) -> None:
        """Send pending replies (within ``timeout`` s) and release the port. Safe to call more than once,
        and after a failed or missing :meth:`start`."""


def raise_open_file_limit() -> int:
    """Raise this process's open-file soft limit to its hard limit (idle connections then cost descriptors,
    not the server); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


class PendingConnections:
    """The accepted connections a door has not admitted yet (handshake or request still to come), oldest
    first, at most ``limit``: accepting one more shuts the oldest down (``shutdown()``, so its transport
    closes itself; the descriptor is never closed under it). Used on the door's event-loop thread only."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.dropped = 0
        """Connections shut down to make room."""
        self._socks: dict[int, socket.socket] = {}  # fd -> socket, oldest first

    def __len__(self) -> int:
        self._prune()
        return len(self._socks)

    def accepted(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        self._socks.pop(fd, None)  # a descriptor number reused after its old socket closed
        if len(self._socks) >= self.limit:
            self._prune()
        while len(self._socks) >= self.limit:
            old = self._socks.pop(next(iter(self._socks)))
            self.dropped += 1
            try:
                old.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._socks[fd] = sock

    def admitted(self, fd: int | None) -> None:
        """The connection on ``fd`` passed its handshake: it no longer counts as pending."""
        if fd is not None:
            self._socks.pop(fd, None)

    def _prune(self) -> None:
        for fd, sock in list(self._socks.items()):
            if sock.fileno() != fd:  # closed
                del self._socks[fd]


class LimitedListener(socket.socket):
    """A listening socket whose :meth:`accept` registers each new connection with ``pending``
    (asyncio's servers accept through it)."""

    pending: PendingConnections

    @classmethod
    def wrap(cls, sock: socket.socket, pending: PendingConnections) -> LimitedListener:
        listener = cls(sock.family, sock.type, sock.proto, fileno=sock.detach())
        listener.pending = pending
        return listener

    def accept(self) -> tuple[socket.socket, object]:
        conn, addr = super().accept()
        self.pending.accepted(conn)
        return conn, addr
