"""The generic Ray worker pool: work items (indices) handed to worker actors as their slots free up.

:class:`WorkerPool` starts ``workers`` actors (each reserving ``cpus_per_worker`` Ray CPUs), hands out item
indices slot by slot so fast workers take more, and keys results by index. When a worker's actor or node dies,
the items it had in flight go back to the front of the queue and a replacement worker is started (at most
``max_worker_restarts`` in all), so every item is counted exactly once. Actors derive from :class:`PoolActor`
(``ready``/``close``) and add ``work(new_items)``. :func:`pool_session` starts or joins Ray for a run
(:mod:`policyserve.cluster.runtime`); nothing here knows what an item is (the eval workers live in
:mod:`policyserve.eval.distributed`). Ray is imported only when a session starts.
"""

from __future__ import annotations

import os
import resource
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, PolicyServeError

FORWARDED_ENV = ("MUJOCO_GL", "PYOPENGL_PLATFORM")
"""Environment variables of the driver that the workers get too (headless rendering)."""


class DistributedError(PolicyServeError):
    """The distributed run cannot go on (no worker could be started, or every worker died)."""



@dataclass
class DistributedConfig:
    """How many Ray workers, on which cluster, and how worker failures are handled."""

    workers: int = 2
    """Ray worker actors running at once (each replaced when it dies, within ``max_worker_restarts``)."""
    address: str | None = None
    """Ray cluster address (``ray start --head`` prints it); None starts a local Ray instance for the run."""
    cpus_per_worker: float = 1.0
    """Ray CPUs each worker actor reserves (a worker steps its envs on one core)."""
    max_worker_restarts: int | None = None
    """Replacement workers started in all after worker deaths (default: ``workers``)."""
    start_timeout_s: float = 300.0
    """How long the run may wait with no worker started (e.g. no free CPU on the cluster) before it fails."""
    on_result: Callable[[WorkerPool, int], None] | None = None
    """Called in the driver after each counted result with the pool and the item's index (monitoring,
    fault-injection tests)."""

    def __post_init__(self) -> None:
        if isinstance(self.workers, bool) or not isinstance(self.workers, int):
            raise ConfigError(f"workers must be an integer >= 1, got {self.workers!r}")
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker!r}")
        if self.max_worker_restarts is None:
            self.max_worker_restarts = self.workers
        if self.max_worker_restarts < 0:
            raise ConfigError(f"max_worker_restarts must be >= 0, got {self.max_worker_restarts!r}")


@dataclass
class PoolWorker:
    """One worker actor as the driver sees it."""

    wid: int
    handle: Any
    started: bool = False
    inflight: list[int] = field(default_factory=list)
    """Items handed to the worker and not yet returned."""
    call: Any = None
    """The worker's call in progress (its ObjectRef)."""
    info: dict[str, Any] = field(default_factory=dict)
    """Where it runs (node, pid) and its latest stats."""


def _lost_errors(ray: Any) -> tuple[type[BaseException], ...]:
    """Errors that mean a worker (actor, process or node) is gone, not that its work failed."""
    ex = ray.exceptions
    return tuple(getattr(ex, n) for n in ("RayActorError", "WorkerCrashedError", "NodeDiedError", "ObjectLostError")
                 if hasattr(ex, n))


class WorkerPool:
    """Work items (indices) handed to worker actors slot by slot; results keyed by index (module docstring).

    ``spawn(wid)`` creates a worker actor with methods ``ready() -> dict`` and
    ``work(new_items) -> (finished [(item, payload), ...], stats dict)``; ``work`` returns once at least
    one of its items has finished.
    """

    def __init__(self, ray: Any, spawn: Callable[[int], Any], config: DistributedConfig, slots: int = 1) -> None:
        self.ray, self.spawn, self.config, self.slots = ray, spawn, config, slots
        self.workers: dict[int, PoolWorker] = {}
        self.retired: list[PoolWorker] = []
        self.failures = 0
        self.requeued: list[int] = []
        """Items re-run because their worker died."""
        self.restarts_left = int(config.max_worker_restarts or 0)
        self.first_ready: float | None = None
        """``perf_counter()`` when the first worker was ready (work started)."""
        self._next_wid = 0
        self._calls: dict[Any, PoolWorker] = {}
        self._lost = _lost_errors(ray)

    def _start_worker(self) -> None:
        wid, self._next_wid = self._next_wid, self._next_wid + 1
        worker = PoolWorker(wid, self.spawn(wid))
        worker.call = worker.handle.ready.remote()
        self._calls[worker.call] = worker
        self.workers[wid] = worker

    def _dispatch(self, queue: deque[int]) -> None:
        for worker in self.workers.values():
            if not worker.started or worker.call is not None:
                continue
            new = [queue.popleft() for _ in range(min(self.slots - len(worker.inflight), len(queue)))]
            if new or worker.inflight:
                worker.inflight += new
                worker.call = worker.handle.work.remote(new)
                self._calls[worker.call] = worker

    def _worker_lost(self, worker: PoolWorker, queue: deque[int], done: dict[int, Any], exc: BaseException) -> None:
        del self.workers[worker.wid]
        self.retired.append(worker)
        self.failures += 1
        lost = [i for i in worker.inflight if i not in done]
        queue.extendleft(reversed(lost))
        self.requeued += lost
        if self.restarts_left > 0:
            self.restarts_left -= 1
            self._start_worker()
        elif not self.workers:
            raise DistributedError(f"every worker died and no restarts are left ({len(done)} items done); last "
                                   f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")

    def run(self, items: Sequence[int], on_result: Callable[[int, Any, PoolWorker], None]) -> dict[int, Any]:
        """Run every item; ``on_result(item, payload, worker)`` is called once per item as it is counted."""
        ray = self.ray
        queue: deque[int] = deque(items)
        done: dict[int, Any] = {}
        waiting_since = time.monotonic()
        try:
            for _ in range(self.config.workers):
                self._start_worker()
            while len(done) < len(items):
                self._dispatch(queue)
                ready, _ = ray.wait(list(self._calls), num_returns=1, timeout=1.0)
                if not ready:
                    if not any(w.started for w in self.workers.values()) and \
                            time.monotonic() - waiting_since > self.config.start_timeout_s:
                        raise DistributedError(
                            f"no worker started within {self.config.start_timeout_s:.0f} s (does the Ray cluster "
                            f"have {self.config.cpus_per_worker:g} free CPU for a worker?)")
                    continue
                worker = self._calls.pop(ready[0])
                worker.call = None
                try:
                    value = ray.get(ready[0])
                except ray.exceptions.RayTaskError as exc:
                    cause = getattr(exc, "cause", None)
                    raise (cause if isinstance(cause, Exception) else exc) from None
                except self._lost as exc:
                    self._worker_lost(worker, queue, done, exc)
                    continue
                if not worker.started:
                    worker.started = True
                    self.first_ready = self.first_ready or time.perf_counter()
                    worker.info.update(value)
                    waiting_since = time.monotonic()
                    continue
                finished, stats = value
                worker.info.update(stats)
                for item, payload in finished:
                    worker.inflight.remove(item)
                    if item in done:
                        continue  # cannot happen unless a lost worker's result arrives after all
                    done[item] = payload
                    on_result(item, payload, worker)
                    if self.config.on_result is not None:
                        self.config.on_result(self, item)
        finally:
            self._stop_workers()
        return done

    def _stop_workers(self) -> None:
        """Idle workers close their envs, clients and temporary folder (bounded wait); then every worker is killed."""
        ray = self.ray
        idle = [w for w in self.workers.values() if w.started and w.call is None]
        if idle:
            ray.wait([w.handle.close.remote() for w in idle], num_returns=len(idle), timeout=10.0)
        for worker in self.workers.values():
            ray.kill(worker.handle)

    def worker_info(self) -> list[dict[str, Any]]:
        """Every worker's node, pid and latest stats (dead ones with ``"died": True``)."""
        rows = [{"worker": w.wid, **w.info, "died": False} for w in self.workers.values()]
        rows += [{"worker": w.wid, **w.info, "died": True} for w in self.retired]
        return sorted(rows, key=lambda r: r["worker"])


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


class PoolActor:
    """Base of the pool's worker actors: forwarded env vars, the startup error kept for ``ready``, cleanup."""

    def __init__(self, env_vars: dict[str, str]) -> None:
        os.environ.update(env_vars)
        self.error: Exception | None = None
        self.stack = ExitStack()
        self._tmp: Path | None = None

    def temp_folder(self) -> Path:
        """This worker's temporary folder for the files it sends back (made on first use)."""
        if self._tmp is None:
            self._tmp = Path(self.stack.enter_context(tempfile.TemporaryDirectory(prefix="policyserve-worker-")))
        return self._tmp

    def ready(self) -> dict[str, Any]:
        """Where the worker runs; raises the error that stopped it from starting."""
        if self.error is not None:
            raise self.error
        import ray

        return {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def close(self) -> None:
        """Close the envs, clients and temporary folder."""
        self.stack.close()


def actor_spawner(ray: Any, cls: type, config: DistributedConfig, *args: Any) -> Callable[[int], Any]:
    """A ``spawn(wid)`` for :class:`WorkerPool`: a new ``cls(*args, env_vars)`` actor with the pool's CPUs, spread
    over the cluster's nodes, never restarted by Ray (the pool replaces it)."""
    from .runtime import absolute_paths

    actor = ray.remote(cls)
    env_vars = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    args = tuple(absolute_paths(arg) for arg in args)  # workers run in another directory

    def spawn(wid: int) -> Any:
        return actor.options(num_cpus=config.cpus_per_worker, scheduling_strategy="SPREAD",
                             max_restarts=0).remote(*args, env_vars)

    return spawn


def pool_session(config: DistributedConfig) -> Any:
    """A Ray session for a pool run: joins ``config.address`` or starts a local Ray with enough CPUs for it."""
    from .runtime import ray_session

    local_cpus = max(os.cpu_count() or 1, int(-(-config.workers * config.cpus_per_worker // 1)))
    return ray_session(config.address, num_cpus=local_cpus)


__all__ = [
    "DistributedConfig", "DistributedError", "FORWARDED_ENV", "PoolActor", "PoolWorker", "WorkerPool",
    "actor_spawner", "peak_rss_mb", "pool_session",
]
