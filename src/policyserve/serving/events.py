"""What the :class:`~policyserve.serving.scheduler.Scheduler` and the front doors report as they work (for logs
and metrics)."""

from __future__ import annotations

from typing import Any

from .request import Request


class SchedulerListener:
    """No-op base: override the events you need. Called from front-door and worker threads."""

    def rejected(self, request: Request, limit: str) -> None:
        """``request`` was refused as busy because of ``limit`` (a SchedulerConfig field name)."""

    def queue_depth(self, queued: int) -> None:
        """Requests waiting after a change."""

    def batch(self, endpoint: str, size: int, policy_ms: float) -> None:
        """One backend call served ``size`` requests in ``policy_ms``."""

    def answered(self, request: Request, ok: bool, policy_start: float | None, policy_end: float | None) -> None:
        """``request`` is answered (``ok`` False for a failure), just before its reply is handed to its door;
        perf_counter times of its call."""

    def failed(self, request: Request, exc: BaseException) -> None:
        """``request``'s call raised ``exc`` (it is answered with an error)."""

    def invalid(self, protocol: str, endpoint: str) -> None:
        """A front door answered a request with an error without queueing it (undecodable, too large,
        unknown endpoint, unmappable); ``endpoint`` is ``"unknown"`` when it could not be read."""

    def unauthorized(self, protocol: str) -> None:
        """A front door refused a request or connection for a missing or wrong API token."""


NULL_LISTENER = SchedulerListener()


class Listeners(SchedulerListener):
    """Forwards every event to several listeners (``listeners`` may grow before the server starts)."""

    def __init__(self, *listeners: SchedulerListener | None) -> None:
        self.listeners = [listener for listener in listeners if listener is not None]


def _fan_out(name: str) -> Any:
    def forward(self: Listeners, *args: Any) -> None:
        for listener in self.listeners:
            getattr(listener, name)(*args)

    forward.__name__ = forward.__qualname__ = name
    forward.__doc__ = getattr(SchedulerListener, name).__doc__
    return forward


for _event in [name for name in vars(SchedulerListener) if not name.startswith("_")]:
    setattr(Listeners, _event, _fan_out(_event))
