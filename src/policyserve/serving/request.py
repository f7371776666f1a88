"""What a front door hands the scheduler (:class:`Request`) and what it gets back (an :data:`Outcome`).

Outcomes are typed and wire-free: an :class:`ActionResult` (action, the policy's info, and the
server's :class:`Timing`), a :class:`CallResult` (the value of ``reset`` or a custom endpoint), or a
:class:`Failure` that says why (busy, shutting down, invalid, internal) and carries the error text.
Each door encodes them in its own wire format.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Union

from ..errors import PolicyServeError, ProtocolError, ValidationError

SHUTTING_DOWN = "server shutting down"


class ServerBusyError(PolicyServeError):
    """A request was refused because a queue limit was reached (the message names the limit)."""


class ShuttingDownError(ServerBusyError):
    """A request was refused because the server is shutting down."""

    def __init__(self, message: str = SHUTTING_DOWN) -> None:
        super().__init__(message)


class FailureKind(str, Enum):
    """Why a request was not answered with a result."""

    BUSY = "busy"
    """Refused over a queue limit."""
    SHUTTING_DOWN = "shutting_down"
    """Refused or dropped because the server is shutting down."""
    INVALID = "invalid"
    """The request itself is wrong (undecodable, fails validation, unknown endpoint)."""
    INTERNAL = "internal"
    """The policy (or a handler) failed."""


@dataclass(frozen=True)
class Failure:
    """A request that ends in an error; ``message`` is the text the client sees."""

    kind: FailureKind
    message: str

    @classmethod
    def from_exception(cls, exc: BaseException) -> Failure:
        """The failure ``exc`` stands for, with :func:`error_message` as its text."""
        return cls(failure_kind(exc), error_message(exc))


@dataclass
class Timing:
    """Where a request's time went on the server (milliseconds)."""

    queue_ms: float
    """Receipt to the start of the policy call that served it."""
    policy_ms: float
    """That policy call (shared by every request merged into it)."""
    merged_requests: int
    """Requests served by that call."""
    recv_to_reply_ms: float
    """Receipt to the hand-over of the reply to the door."""


@dataclass
class ActionResult:
    """A ``get_action`` answered: the client's rows of the action, the policy's info, the server's timing."""

    action: dict[str, Any]
    info: dict[str, Any]
    timing: Timing


@dataclass
class CallResult:
    """``reset`` or a custom endpoint answered with ``value``."""

    value: Any


Outcome = Union[ActionResult, CallResult, Failure]
"""What a request's reply callback receives, exactly once."""


@dataclass
class Request:
    """One call from a client, as a front door hands it to the scheduler."""

    client: str
    """Who sent it (stable per connection): fairness turns and per-client state are keyed by it."""
    endpoint: str
    data: dict[str, Any]
    reply: Callable[[Outcome], None]
    """Called once, from a scheduler worker (or from the scheduler's ``close``), with the outcome."""
    nbytes: int = 0
    """Memory the request holds: its decoded size (at least its size on the wire); counts against
    ``max_queued_bytes``."""
    protocol: str = ""
    """The door's protocol (``gr00t``, ``openpi``): a label for events and metrics."""
    received: float = field(default_factory=time.perf_counter)
    """``time.perf_counter()`` at receipt."""
    call: Callable[[], Any] | None = None
    """For endpoints other than get_action/reset: what to run on the worker."""


def failure_kind(exc: BaseException) -> FailureKind:
    """The :class:`FailureKind` of an exception raised while serving a request."""
    if isinstance(exc, ShuttingDownError):
        return FailureKind.SHUTTING_DOWN
    if isinstance(exc, ServerBusyError):
        return FailureKind.BUSY
    kind = getattr(exc, "failure_kind", None)  # carried across processes (a Ray replica's error)
    if isinstance(kind, FailureKind):
        return kind
    if isinstance(exc, (ValidationError, ProtocolError)):
        return FailureKind.INVALID
    return FailureKind.INTERNAL


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def error_message(exc: BaseException) -> str:
    """Text of an error reply: our errors as-is, others prefixed by their type; heap addresses (``<... at
    0x7f...>`` in object reprs) are left out."""
    text = str(exc) if isinstance(exc, (PolicyServeError, AssertionError)) else f"{type(exc).__name__}: {exc}"
    return _ADDRESS.sub("", text)
