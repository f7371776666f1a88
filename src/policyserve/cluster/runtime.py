"""Starting or joining Ray for the distributed commands, and leaving it as it was found.

``with ray_session(address=None) as ray:`` connects to the cluster at ``address`` (left running at exit), or,
with no address, starts a local Ray instance sized for this machine and shuts it down at exit, also when the
body raises (Ctrl-C's KeyboardInterrupt included). When Ray is already initialised in this process (a test or
notebook that called ``ray.init``), that session is used and left alone. Ray is imported only here and in
the modules that run on it, so commands without ``--workers`` never import it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, PolicyServeError


class RayUnavailableError(PolicyServeError):
    """Ray is not installed, or the Ray cluster at the given address cannot be reached."""


def import_ray() -> Any:
    """The ``ray`` module, or :class:`RayUnavailableError` saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise RayUnavailableError(f"Ray is not installed ({exc}); install it with pip install 'policyserve[ray]'") \
            from None
    return ray


@dataclass(frozen=True)
class RayConnection:
    """What :func:`join_ray` did: ``connected`` (this call initialised Ray: shut it down when done) and
    ``local`` (it started a local instance, which goes away with the shutdown)."""

    ray: Any
    connected: bool
    local: bool


def join_ray(address: str | None = None, *, num_cpus: int | None = None, object_store_mb: int = 200) -> RayConnection:
    """Connect to the cluster at ``address``, or start a local instance with ``num_cpus`` CPUs (default: this
    machine's count), an ``object_store_mb`` MB object store and worker processes at normal priority. Ray that
    is already initialised in this process is used as it is (``connected=False``)."""
    ray = import_ray()
    if ray.is_initialized():
        return RayConnection(ray, connected=False, local=False)
    if num_cpus is not None and num_cpus < 1:
        raise ConfigError(f"num_cpus must be >= 1, got {num_cpus}")
    common = {"log_to_driver": False, "logging_level": logging.WARNING}
    try:
        if address:
            ray.init(address=address, **common)
        else:
            # "local": a new instance even when another Ray runs on this machine (ray.init() would join it)
            # worker_niceness 0: the workers run at the priority of a single-process run (Ray's default, nice 15,
            # lets any other busy process on the machine take their cores)
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1,
                     object_store_memory=object_store_mb * 2**20, include_dashboard=False,
                     _system_config={"worker_niceness": 0}, **common)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        ray.shutdown()
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise RayUnavailableError(f"could not start or reach {where}: {exc}") from None
    return RayConnection(ray, connected=True, local=not address)


@contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None,
                object_store_mb: int = 200) -> Iterator[Any]:
    """:func:`join_ray` for the body of a ``with``; yields the ``ray`` module and shuts down what it started
    (see module docstring)."""
    connection = join_ray(address, num_cpus=num_cpus, object_store_mb=object_store_mb)
    try:
        yield connection.ray
    finally:
        if connection.connected:
            connection.ray.shutdown()
