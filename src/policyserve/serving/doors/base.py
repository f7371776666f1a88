"""Extra doors into a :class:`~policyserve.serving.server.PolicyServer`: another protocol's clients
(openpi) or metrics scrapers, each on its own port, started and stopped with the server."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..server import PolicyServer


class FrontDoor(ABC):
    """Lifecycle the server drives: :meth:`bind` (while binding its own port), :meth:`start` (once the
    scheduler runs), :meth:`stop_reading` (first step of shutdown, before the scheduler answers what is
    queued) and :meth:`close` (after the scheduler has answered everything)."""

    name: str = "front door"
    protocol: str | None = None
    """The client protocol the door speaks (``Request.protocol`` of what it submits), if any."""

    @abstractmethod
    def bind(self, server: PolicyServer) -> int:
        """Open the port (raising :class:`~policyserve.serving.server.AddressInUseError` when taken); returns it.

        ``server`` gives the scheduler, backend, listener, host and token the door serves with."""

    @abstractmethod
    def start(self) -> None:
        """Accept clients (returns once listening)."""

    def stop_reading(self) -> None:
        """Take no new connections or requests; replies still go out."""

    @abstractmethod
    def close(self, timeout: float) -> None:
        """Send pending replies (within ``timeout`` s) and release the port. Safe to call more than once."""
