"""The composition root of a policy server: a backend, a scheduler and the front doors around them.

:class:`PolicyServer` holds the backend (the policy in this process, or Ray replicas), the
:class:`~policyserve.serving.scheduler.Scheduler`, the limits and token (:class:`ServerConfig`), the
event listeners and a list of doors (:mod:`policyserve.serving.doors`): the GR00T ZeroMQ door, the openpi
websocket door, the metrics exporter. It serves no wire protocol itself. ``PolicyServer(policy, host,
port)`` is the simple form: one GR00T door on ``port``; ``port=None`` opens none, and the server serves
through the doors added with :meth:`PolicyServer.add_front_door`.

Start-up: bind every door (a taken port raises :class:`AddressInUseError` and leaves nothing open), start
the scheduler, start the doors. Shutdown (GR00T's ``kill``, :meth:`PolicyServer.stop`, SIGTERM/Ctrl-C in
``policyserve serve``), in order: every door stops reading; the scheduler answers queued requests with
"server shutting down" and finishes the calls in progress; the doors send what is pending and close;
the backend closes.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..policies.base import BasePolicy
from .backend import Backend, PolicyBackend, replica_count
from .doors.base import AddressInUseError, ConnectionLimits, DoorContext, FrontDoor, raise_open_file_limit
from .doors.gr00t import DEFAULT_PORT, Gr00tDoor, log_error
from .events import Listeners, SchedulerListener
from .request import Request
from .scheduler import Scheduler, SchedulerConfig

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "AddressInUseError", "PolicyServer", "SchedulerConfig", "ServerConfig"]


@dataclass
class ServerConfig:
    """How a :class:`PolicyServer` serves, whatever its doors (ports belong to the doors)."""

    host: str = "127.0.0.1"
    """Address the doors listen on (``0.0.0.0`` for all interfaces)."""
    api_token: str | None = None
    """Shared secret required on every request (GR00T, ``kill`` included) and openpi connection; None: none."""
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    """Largest request (all its frames) answered; a larger one gets an error."""
    hard_limit_bytes: int | None = None
    """Largest message a door reads at all (default 4x ``max_message_bytes``); libzmq drops larger frames
    before allocating them, disconnecting that peer."""
    shutdown_timeout: float = 60.0
    """Longest wait at shutdown for the policy calls in progress (seconds)."""
    verbose: bool = True
    """Print the doors' addresses, request errors and shutdown progress."""
    curve_secret_key: str | None = None
    """CurveZMQ secret key file (``policyserve keys generate``) for the GR00T door: encrypted links; None: plain."""
    curve_authorized_keys: str | None = None
    """Folder of client public key files (``*.key``) admitted over CurveZMQ; None: any client with the server's key."""
    max_connections: int = 1024
    """Most open connections per websocket/HTTP door (openpi, metrics: 64 at most); openpi refuses more with
    HTTP 503 at the handshake."""
    max_pending_connections: int = 256
    """Most connections per door still in their handshake (TCP open, nothing admitted yet); a new one past it
    drops the oldest, so idle sockets cannot lock new clients out."""
    open_timeout: float = 10.0
    """Seconds a new connection has to finish its handshake (openpi's TLS + HTTP upgrade, GR00T's ZMTP
    greeting, a metrics request) before it is dropped."""
    idle_timeout: float = 600.0
    """Seconds an openpi connection may send nothing (no request in flight) before it is closed; 0: never."""
    max_unsent_bytes: int = 64 << 20
    """Replies (bytes) held for one client (openpi or GR00T) that does not read them; past it, its requests
    are answered "server busy" until it reads."""
    tls_cert: str | None = None
    """PEM certificate (chain) file: the openpi door serves ``wss://`` (TLS) instead of ``ws://``."""
    tls_key: str | None = None
    """PEM private key file of ``tls_cert`` (None: the key is in ``tls_cert``)."""
    metrics_token: str | None = None
    """Token the metrics endpoint requires as ``Authorization: Bearer <token>``; None: no check."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """Batching and queue limits."""

    def __post_init__(self) -> None:
        if self.curve_authorized_keys is not None and self.curve_secret_key is None:
            raise ConfigError("curve_authorized_keys needs curve_secret_key (the server's CurveZMQ key pair)")
        if self.max_message_bytes < 1:
            raise ConfigError(f"max_message_bytes must be >= 1, got {self.max_message_bytes}")
        for name in ("max_connections", "max_pending_connections", "max_unsent_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.open_timeout > 0 or self.idle_timeout < 0:
            raise ConfigError(f"open_timeout must be > 0 and idle_timeout >= 0, got {self.open_timeout} and "
                              f"{self.idle_timeout}")
        if self.tls_key is not None and self.tls_cert is None:
            raise ConfigError("tls_key needs tls_cert (the certificate it belongs to)")
        if self.hard_limit_bytes is not None and self.hard_limit_bytes < self.max_message_bytes:
            raise ConfigError(f"hard_limit_bytes must be >= max_message_bytes ({self.max_message_bytes}), "
                              f"got {self.hard_limit_bytes}")

    @property
    def read_limit_bytes(self) -> int:
        """``hard_limit_bytes``, or its default."""
        return self.hard_limit_bytes or 4 * self.max_message_bytes

    def with_overrides(self, **overrides: Any) -> ServerConfig:
        """A copy with fields of this config or of its :class:`SchedulerConfig` replaced (by field name)."""
        own = {f.name for f in dataclasses.fields(self)}
        nested = {f.name for f in dataclasses.fields(SchedulerConfig)}
        unknown = sorted(set(overrides) - own - nested)
        if unknown:
            raise TypeError(f"unknown server setting(s) {', '.join(unknown)}; expected fields of ServerConfig "
                            f"({', '.join(sorted(own))}) or SchedulerConfig ({', '.join(sorted(nested))})")
        scheduler = dataclasses.replace(self.scheduler, **{k: v for k, v in overrides.items() if k in nested})
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if k in own}, scheduler=scheduler)


class _LogListener(SchedulerListener):
    def failed(self, request: Request, exc: BaseException) -> None:
        log_error(exc, f"{request.protocol} {request.endpoint} failed")


class PolicyServer:
    """Serve ``policy`` (or a ``backend``) through front doors until ``kill`` or :meth:`stop`.

    The simple form ``PolicyServer(policy, host, port, api_token)`` adds a GR00T door on ``tcp://host:port``
    (``port=0`` picks a free port, see :attr:`port` after :meth:`bind`; ``port=None`` adds none). ``config``
    holds the limits, token and batching (:class:`ServerConfig`); ``host``, ``api_token`` and keyword
    arguments named after a :class:`ServerConfig` or :class:`SchedulerConfig` field (``verbose=False``,
    ``max_batch_size=8``) override it.
    """

    def __init__(
        self,
        policy: BasePolicy | None = None,
        host: str | None = None,
        port: int | None = DEFAULT_PORT,
        api_token: str | None = None,
        *,
        backend: Backend | None = None,
        config: ServerConfig | None = None,
        listener: SchedulerListener | None = None,
        **overrides: Any,
    ) -> None:
        if (policy is None) == (backend is None):
            raise ValueError("PolicyServer needs exactly one of policy or backend")
        if host is not None:
            overrides["host"] = host
        if api_token is not None:
            overrides["api_token"] = api_token
        config = (config or ServerConfig()).with_overrides(**overrides)
        self.policy = policy
        self.backend = backend or PolicyBackend(policy)  # type: ignore[arg-type]
        self.config = dataclasses.replace(
            config, scheduler=dataclasses.replace(config.scheduler, workers=self.backend.concurrency))
        self.listener = Listeners(listener, _LogListener() if self.config.verbose else None)
        """Every event of the scheduler and the front doors goes here (see :meth:`add_listener`)."""
        self.scheduler = Scheduler(self.backend, self.config.scheduler, self.listener)
        self.doors: list[FrontDoor] = []
        self.gr00t: Gr00tDoor | None = None
        """The GR00T door, when the server has one."""
        self._bound = False
        self._stop_requested = threading.Event()
        self._listening = threading.Event()
        self._closed = threading.Event()
        self._shutdown_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        if port is not None:
            self.add_front_door(Gr00tDoor(port))

    # -- settings --------------------------------------------------------------------------------
    @property
    def host(self) -> str:
        return self.config.host

    @property
    def api_token(self) -> str | None:
        return self.config.api_token

    @property
    def verbose(self) -> bool:
        return self.config.verbose

    @property
    def max_message_bytes(self) -> int:
        return self.config.max_message_bytes

    @property
    def hard_limit_bytes(self) -> int:
        return self.config.read_limit_bytes

    @property
    def shutdown_timeout(self) -> float:
        return self.config.shutdown_timeout

    @property
    def port(self) -> int | None:
        """The GR00T door's port once bound (None without a GR00T door)."""
        return self.gr00t.port if self.gr00t is not None else None

    @property
    def endpoint(self) -> str | None:
        """The GR00T door's ``tcp://host:port`` once bound (None without a GR00T door)."""
        return self.gr00t.endpoint if self.gr00t is not None else None

    @property
    def front_doors(self) -> list[FrontDoor]:
        """Every door (the GR00T door included)."""
        return self.doors

    # -- doors, endpoints and listeners ----------------------------------------------------------
    def add_front_door(self, door: FrontDoor) -> None:
        """Serve through ``door`` too (before :meth:`bind`/:meth:`start`); it is bound, started and
        stopped with the server, and gets the server's events if it is a listener."""
        if self._bound:
            raise RuntimeError("add front doors before the server binds")
        if isinstance(door, Gr00tDoor):
            if self.gr00t is not None:
                raise ConfigError("a server has at most one GR00T door (port)")
            self.gr00t = door
        self.doors.append(door)
        if isinstance(door, SchedulerListener):
            self.add_listener(door)

    def register_endpoint(self, name: str, handler: Callable[..., Any], requires_input: bool = True,
                          inline: bool = False) -> None:
        """Add or replace a GR00T endpoint; ``handler(**data)`` when ``requires_input`` else ``handler()``;
        ``inline`` answers on the door's I/O thread (cheap, must not block) instead of a scheduler worker."""
        if self.gr00t is None:
            raise ConfigError("custom endpoints are served by the GR00T door; this server has none (port=None)")
        self.gr00t.register_endpoint(name, handler, requires_input, inline)

    def add_listener(self, listener: SchedulerListener) -> None:
        """Also report scheduler and front-door events to ``listener`` (before :meth:`start`)."""
        self.listener.listeners.append(listener)

    def _context(self) -> DoorContext:
        cfg = self.config
        backend = self.backend
        return DoorContext(
            submit=self.scheduler.submit, check_room=self.scheduler.check_room, listener=self.listener, modality_config=backend.get_modality_config(),
            modality_dims=backend.get_modality_dims(), host=cfg.host, api_token=cfg.api_token,
            max_message_bytes=cfg.max_message_bytes, hard_limit_bytes=cfg.read_limit_bytes, verbose=cfg.verbose,
            curve_secret_key=cfg.curve_secret_key, curve_authorized_keys=cfg.curve_authorized_keys,
            protocols=tuple(dict.fromkeys(d.protocol for d in self.doors if d.protocol is not None)),
            request_stop=self._request_stop, replicas=lambda: replica_count(backend),
            capabilities=frozenset(backend.capabilities),
            connections=ConnectionLimits(cfg.max_connections, cfg.max_pending_connections, cfg.open_timeout,
                                         cfg.idle_timeout, cfg.max_unsent_bytes),
            tls_cert=cfg.tls_cert, tls_key=cfg.tls_key, metrics_token=cfg.metrics_token,
        )

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """True once the server has shut down and released its ports."""
        return self._closed.is_set()

    def bind(self) -> int | None:
        """Bind every door (idempotent); returns the GR00T port (None without a GR00T door). A taken port
        raises :class:`AddressInUseError` and leaves nothing open."""
        if self._bound:
            return self.port
        bound: list[FrontDoor] = []
        raise_open_file_limit()  # connections are bounded per door; the process's soft limit must not be lower
        try:
            context = self._context()
            for door in self.doors:
                door.bind(context)
                bound.append(door)
        except BaseException:
            for door in bound:
                door.close(0)
            self._closed.set()
            raise
        self._bound = True
        return self.port

    def start(self, timeout: float = 10.0) -> int | None:
        """Run the server on a background thread; returns the GR00T port once every door listens."""
        port = self.bind()
        self._thread = threading.Thread(target=self.run, name=f"policyserve-server-{port}", daemon=True)
        self._thread.start()
        if not self._listening.wait(timeout):
            raise RuntimeError(f"server did not start listening within {timeout} s")
        return port

    def _request_stop(self) -> None:
        self._stop_requested.set()

    def stop(self, timeout: float | None = None) -> bool:
        """Shut down cleanly (see the module doc); returns once closed, or False after ``timeout`` s."""
        self._stop_requested.set()
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
        try:
            self.scheduler.start()
            for door in self.doors:
                door.start()
            if self.endpoint is not None and self.verbose:
                print(f"Server is ready and listening on {self.endpoint}", flush=True)
            self._listening.set()
            while not self._stop_requested.wait(1.0):
                pass
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        with self._shutdown_lock:
            if self.closed:
                return
            if self.verbose:
                print("Shutting down server: answering queued requests, finishing calls in progress...", flush=True)
            for door in self.doors:
                door.stop_reading()
            finished = self.scheduler.close(self.shutdown_timeout)
            if not finished and self.verbose:
                print(f"A policy call did not finish within {self.shutdown_timeout} s; closing anyway.", flush=True)
            for door in self.doors:
                door.close(2.0)
            self.backend.close()
            self._closed.set()
            if self.verbose:
                print("Server stopped.", flush=True)
