"""Distributed evaluation on Ray: worker actors pull rollout episodes or demos to compare from the driver's queue.

:func:`run_distributed_rollout` starts ``workers`` Ray actors; each owns ``config.n_envs`` envs and a
:class:`~policyserve.client.driver.PolicyDriver` connected to the policy server over the network, and runs
episodes with the same :class:`~policyserve.eval.rollout.RolloutRunner` as the single-process rollout
(episode ``k`` seeded ``seed + k``, its start state built for ``k`` alone), so per-episode results equal the
single-process run. :func:`run_distributed_comparisons` does the same for the model-vs-replay comparison of
many demos, one demo at a time per worker, each worker with its own model and replay clients.

Only the eval workers live here: the pool that hands them episode or demo indices, replaces dead workers and
counts every item exactly once is :class:`policyserve.cluster.pool.WorkerPool`. Each worker returns its finished
items with their files (MP4 videos, comparison outputs) as bytes, and the driver writes them into its own output
folder and advances one progress bar.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..cluster.pool import DistributedConfig, DistributedError, PoolActor, PoolWorker, WorkerPool, actor_spawner, \
    peak_rss_mb, pool_session
from ..policies.base import BasePolicy
from .compare import ComparisonConfig, run_comparison
from .compare_all import AggregateComparison, DemoSummary, prepare_demos
from .rollout import EpisodeResult, RolloutConfig, RolloutReport, config_dict, open_runner, print_progress, \
    rollout_timing

@dataclass
class ServerAddress:
    """Where the workers reach a policy server over the network."""

    host: str = "127.0.0.1"
    """Address of the policy server that every worker's node can reach."""
    port: int = 5555
    """The server's port."""
    api_token: str | None = None
    """The server's API token, if it requires one."""
    timeout_ms: int = 15000
    """How long a worker's client waits for each reply."""

    def connect(self, role: str = "policy") -> BasePolicy:
        from ..client.connect import connect_policy

        return connect_policy(self.host, self.port, api_token=self.api_token, timeout_ms=self.timeout_ms, role=role)


def _read_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _write_files(folder: Path, files: dict[str, bytes]) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, data in files.items():
        (folder / name).write_bytes(data)
        written[name] = str(folder / name)
    return written


class RolloutWorker(PoolActor):
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


class CompareWorker(PoolActor):
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
    with pool_session(dist) as ray:
        pool = WorkerPool(ray, actor_spawner(ray, RolloutWorker, dist, server, config, n_envs), dist, slots=n_envs)

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
    with pool_session(dist) as ray:
        pool = WorkerPool(ray, actor_spawner(ray, CompareWorker, dist, model, replay, config), dist, slots=1)

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
