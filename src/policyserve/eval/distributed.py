"""Distributed evaluation on Ray: worker actors pull rollout episodes or demos to compare from the driver's queue.

:func:`run_distributed_rollout` starts ``workers`` Ray actors; each owns ``config.n_envs`` envs and a
:class:`~policyserve.client.driver.PolicyDriver` connected to the policy server over the network, and runs
episodes with the same :class:`~policyserve.eval.rollout.RolloutRunner` as the single-process rollout
(episode ``k`` seeded ``seed + k``, its start state built for ``k`` alone), so per-episode results equal the
single-process run. :func:`run_distributed_comparisons` does the same for the model-vs-replay comparison of
many demos, one demo at a time per worker, each worker with its own model and replay clients.

The driver (:class:`WorkerPool`) hands out indices as worker slots free up, so fast workers take more. Each
worker returns its finished items with their files (MP4 videos, comparison outputs) as bytes, and the driver
writes them into its own output folder and advances one progress bar. When a worker's actor or node dies,
the items it had in flight go back to the front of the queue, a replacement worker is started (at most
``max_worker_restarts`` in all) and results are keyed by index, so every item is counted exactly once.
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError, PolicyServeError
from ..policies.base import BasePolicy
from .compare import ComparisonConfig, run_comparison
from .compare_all import AggregateComparison, DemoSummary, prepare_demos
from .rollout import EpisodeResult, RolloutConfig, RolloutReport, config_dict, open_runner, print_progress, \
    rollout_timing

FORWARDED_ENV = ("MUJOCO_GL", "PYOPENGL_PLATFORM")
"""Environment variables of the driver that the workers get too (headless rendering)."""


class DistributedError(PolicyServeError):
    """The distributed run cannot go on (no worker could be started, or every worker died)."""


@dataclass
class ServerAddress:
    """Where the workers reach a policy server over the network."""

    host: str = "127.0.0.1"
    port: int = 5555
    api_token: str | None = None
    timeout_ms: int = 15000

    def connect(self, role: str = "policy") -> BasePolicy:
        from ..client.connect import connect_policy

        return connect_policy(self.host, self.port, api_token=self.api_token, timeout_ms=self.timeout_ms, role=role)


@dataclass
class DistributedConfig:
    """How many Ray workers, on which cluster, and how worker failures are handled."""

    workers: int = 2
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
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ConfigError(f"workers must be a positive integer, got {self.workers!r}")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker!r}")
        if self.max_worker_restarts is None:
            self.max_worker_restarts = self.workers
        if self.max_worker_restarts < 0:
            raise ConfigError(f"max_worker_restarts must be >= 0, got {self.max_worker_restarts!r}")


# ---------------------------------------------------------------------------------------------- the pool
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


def _read_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _write_files(folder: Path, files: dict[str, bytes]) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, data in files.items():
        (folder / name).write_bytes(data)
        written[name] = str(folder / name)
    return written


# ---------------------------------------------------------------------------------------------- workers
class _Worker:
    """Common part of the worker actors: environment, startup error kept for ``ready``, cleanup."""

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


class RolloutWorker(_Worker):
    """Ray actor: ``config.n_envs`` envs and a driver connected to the policy server, running given episodes."""

    def __init__(self, server: ServerAddress, config: RolloutConfig, n_envs: int, env_vars: dict[str, str]) -> None:
        super().__init__(env_vars)
        try:
            policy = server.connect()  # first: a worker that cannot connect leaves no folder behind
            cfg = replace(config, video_dir=str(self.temp_folder()) if config.video_dir else None, progress=False)
            self.runner = self.stack.enter_context(open_runner(policy, cfg, n_envs, owns_policy=True))
        except Exception as exc:  # noqa: BLE001 - reported by ready(), with its own message
            self.error = exc
            self.stack.close()

    def work(self, episodes: list[int]) -> tuple[list[tuple[int, Any]], dict[str, Any]]:
        out = []
        for result in self.runner.advance(episodes):
            video = None
            if result.video:
                path = Path(result.video)
                video = path.read_bytes()
                path.unlink()
                result.video = path.name
            out.append((result.episode, (result, video)))
        return out, {**self.runner.stats(), "peak_rss_mb": peak_rss_mb()}


class CompareWorker(_Worker):
    """Ray actor: a model and a replay client of its own, comparing given demos one at a time."""

    def __init__(self, model: ServerAddress, replay: ServerAddress, config: ComparisonConfig,
                 env_vars: dict[str, str]) -> None:
        super().__init__(env_vars)
        try:
            self.model = model.connect("model")
            self.stack.callback(self.model.close)
            self.replay = replay.connect("replay")
            self.stack.callback(self.replay.close)
            self.config = config
        except Exception as exc:  # noqa: BLE001 - reported by ready(), with its own message
            self.error = exc
            self.stack.close()

    def work(self, demos: list[int]) -> tuple[list[tuple[int, Any]], dict[str, Any]]:
        out = []
        for demo in demos:
            folder = self.temp_folder() / f"demo_{demo}"
            cfg = replace(self.config, demo_index=demo, output_dir=str(folder) if self.config.output_dir else None,
                          progress=False)
            result = run_comparison(self.model, self.replay, cfg)
            files = _read_files(folder) if folder.is_dir() else {}
            for path in files:
                (folder / path).unlink()
            out.append((demo, (result, files)))
        return out, {"peak_rss_mb": peak_rss_mb()}


# ---------------------------------------------------------------------------------------------- drivers
def _spawner(ray: Any, cls: type, config: DistributedConfig, *args: Any) -> Callable[[int], Any]:
    actor = ray.remote(cls)
    env_vars = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}

    def spawn(wid: int) -> Any:
        return actor.options(num_cpus=config.cpus_per_worker, scheduling_strategy="SPREAD",
                             max_restarts=0).remote(*args, env_vars)

    return spawn


def _session(config: DistributedConfig) -> Any:
    from ..cluster.runtime import ray_session

    local_cpus = max(os.cpu_count() or 1, int(-(-config.workers * config.cpus_per_worker // 1)))
    return ray_session(config.address, num_cpus=local_cpus)


def _distributed_timing(pool: WorkerPool, config: DistributedConfig, start: float, end: float) -> dict[str, Any]:
    """Wall time from the first ready worker to the end (as a single-process run, whose wall time excludes
    building its envs), the startup before it, worker failures and each worker's peak memory."""
    info = pool.worker_info()
    ready = pool.first_ready or start
    return {"wall_s": end - ready, "startup_s": ready - start, "workers": config.workers,
            "worker_failures": pool.failures, "requeued": list(pool.requeued),
            "worker_peak_rss_mb": [round(float(w.get("peak_rss_mb", 0.0)), 1) for w in info],
            "worker_nodes": len({w["node"] for w in info if "node" in w})}


def run_distributed_rollout(server: ServerAddress, config: RolloutConfig, dist: DistributedConfig, *,
                            report_path: str | Path | None = None) -> RolloutReport:
    """:func:`~policyserve.eval.rollout.run_rollout` on ``dist.workers`` Ray actors (module docstring).

    Videos are written to ``config.video_dir`` and the report to ``report_path`` on this machine (the driver).
    """
    n_envs = min(config.n_envs, config.n_episodes)
    results: list[EpisodeResult] = []
    video_dir = Path(config.video_dir) if config.video_dir else None
    bar = None
    with _session(dist) as ray:
        pool = WorkerPool(ray, _spawner(ray, RolloutWorker, dist, server, config, n_envs), dist, slots=n_envs)

        def collect(k: int, payload: Any, worker: PoolWorker) -> None:
            result, video = payload
            result.worker = worker.wid
            if video is not None and video_dir is not None:
                video_dir.mkdir(parents=True, exist_ok=True)
                (video_dir / result.video).write_bytes(video)
                result.video = str(video_dir / result.video)
            results.append(result)
            print_progress(bar, result, results)

        start = time.perf_counter()
        try:
            if config.progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=config.n_episodes, desc=f"rollout {config.env.task} ({dist.workers} workers)",
                           unit="ep")
            done = pool.run(range(config.n_episodes), collect)
        finally:
            if bar is not None:
                bar.close()
        end = time.perf_counter()
    workers = pool.worker_info()
    stats = {key: sum(w.get(key, 0) for w in workers)
             for key in ("env_time_s", "policy_queries", "policy_time_s", "policy_wait_s")}
    episodes = [done[k][0] for k in range(config.n_episodes)]
    stats["env_steps"] = sum(e.steps for e in episodes)  # the counted episodes' steps, as in one process
    extra = _distributed_timing(pool, dist, start, end)
    timing = {**rollout_timing(extra["wall_s"], stats), **extra}
    report = RolloutReport(episodes, {**config_dict(config), "workers": dist.workers, "ray_address": dist.address},
                           timing)
    if report_path is not None:
        report.save_json(report_path)
    return report


def run_distributed_comparisons(model: ServerAddress, replay: ServerAddress, config: ComparisonConfig,
                                dist: DistributedConfig, demo_indices: Sequence[int] | None = None
                                ) -> AggregateComparison:
    """The comparison of every demo (or ``demo_indices``) on ``dist.workers`` Ray actors; per-demo outputs and
    the aggregate report are written under ``config.output_dir`` on this machine (the driver)."""
    demos = prepare_demos(config, demo_indices)
    out = Path(config.output_dir) if config.output_dir else None
    summaries: dict[int, DemoSummary] = {}
    bar = None
    with _session(dist) as ray:
        pool = WorkerPool(ray, _spawner(ray, CompareWorker, dist, model, replay, config), dist, slots=1)

        def collect(demo: int, payload: Any, worker: PoolWorker) -> None:
            result, files = payload
            folder = None
            if out is not None:
                folder = out / f"demo_{demo}"
                written = _write_files(folder, files)
                result.files = {kind: str(folder / Path(path).name) for kind, path in result.files.items()
                                if Path(path).name in written}
                result.save_json(folder / "comparison.json")
            summaries[demo] = DemoSummary.from_result(demo, result, folder)
            if bar is not None:
                bar.update(1)
                bar.write(summaries[demo].line())

        start = time.perf_counter()
        try:
            if config.progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(demos), desc=f"compare ({dist.workers} workers)", unit="demo")
            pool.run(demos, collect)
        finally:
            if bar is not None:
                bar.close()
        end = time.perf_counter()
    report = AggregateComparison([summaries[d] for d in demos], {**config_dict(config), "workers": dist.workers,
                                                                "ray_address": dist.address},
                                 _distributed_timing(pool, dist, start, end))
    if out is not None:
        report.save(out)
    return report


__all__ = [
    "CompareWorker", "DistributedConfig", "DistributedError", "PoolWorker", "RolloutWorker",
    "ServerAddress", "WorkerPool", "peak_rss_mb", "run_distributed_comparisons", "run_distributed_rollout",
]
