"""Serving core shared by every front door: the scheduler (batching, limits, fairness) and backends."""

from .backend import Backend, PolicyBackend
from .events import Listeners, SchedulerListener
from .scheduler import Request, Scheduler, SchedulerConfig, ServerBusyError

__all__ = ["Backend", "Listeners", "PolicyBackend", "Request", "Scheduler", "SchedulerConfig", "SchedulerListener",
           "ServerBusyError"]
