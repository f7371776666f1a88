"""Serving, from socket to policy: front doors -> Request -> Scheduler -> Backend -> Outcome -> doors.

- :mod:`.server`: :class:`~.server.PolicyServer`, the composition root (backend, scheduler, doors, shutdown order)
  and :class:`~.server.ServerConfig`;
- :mod:`.doors`: one module per front door (GR00T ZeroMQ, openpi websocket, Prometheus metrics) and the
  interface and checks they share;
- :mod:`.request`: the typed requests and outcomes doors and scheduler exchange;
- :mod:`.scheduler`, :mod:`.events`, :mod:`.backend`: turns and batching, listener events, the in-process backend;
- :mod:`.ray_backend`, :mod:`.ray_replica`: policy replicas on Ray Serve (imports Ray; not imported here);
- :mod:`.spec`: :class:`~.spec.PolicySpec`, what to load, picklable for replicas.
"""

from .backend import Backend, PolicyBackend
from .events import Listeners, SchedulerListener
from .request import (
    ActionResult, CallResult, Failure, FailureKind, Outcome, Request, ServerBusyError, ShuttingDownError, Timing,
)
from .scheduler import Scheduler, SchedulerConfig

__all__ = ["ActionResult", "Backend", "CallResult", "Failure", "FailureKind", "Listeners", "Outcome", "PolicyBackend",
           "Request", "Scheduler", "SchedulerConfig", "SchedulerListener", "ServerBusyError", "ShuttingDownError",
           "Timing"]
