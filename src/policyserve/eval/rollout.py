"""Closed-loop evaluation of a policy (local or behind a server) in the Franka envs.

``run_rollout(policy, RolloutConfig(...)) -> RolloutReport``. ``n_envs`` envs (one
:class:`~policyserve.sim.vector.EnvBatch`, whose batched observation goes to the driver as is) are stepped
together in this process by one :class:`~policyserve.client.driver.PolicyDriver` (batched queries, per-env action queues,
optional temporal ensembling or async inference). Episode ``k`` (0-based) is seeded ``seed + k`` (or starts
from demo ``demo_indices[k]``'s recorded initial state), whichever env runs it, and episodes are handed to
envs as they free up until exactly ``n_episodes`` have run. An env that finishes is reset at once and the
driver resets the policy for that env only (``{"env_ids": [i]}``, plus ``demo_index``/``step_index`` when
starting from demos), so stateful policies (replay, scripted experts) start each episode fresh without
disturbing the other envs. A replay that answers an episode started from demo N must serve demo N of the
dataset converted from ``hdf5_path`` (:func:`~policyserve.eval.identity.check_replay_identity`), and the env's
task and camera size must agree with the ones the file records. Every env's chunks follow its own episode, so
in sync mode a deterministic policy (or a sampling one given a seed in the driver's ``action_options``) gives
the same per-episode results for any ``n_envs``.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..client.driver import DriverConfig, PolicyDriver
from ..data.demos import DemoFile
from ..data.video import VideoWriter
from ..errors import ConfigError
from ..policies.base import BasePolicy
from ..sim.vector import EnvBatch
from .envs import EnvConfig, make_envs
from .identity import check_replay_identity, demo_env_settings, demo_reset_options, warn_camera_size
from .frames import compose_frame
from .smoothness import Smoothness, mean_smoothness, smoothness

FRANKA_DELTA_DIMS = (0, 1, 2, 3, 4, 5)
"""The action dims of policyserve's Franka envs that are end-effector deltas (0 = no motion); dim 6 is the
gripper command. A driver holding such an env still sets them to 0."""


@dataclass
class RolloutConfig:
    """What to evaluate and how (see module docstring)."""

    env: EnvConfig = field(default_factory=EnvConfig)
    driver: DriverConfig = field(default_factory=DriverConfig)
    n_episodes: int = 10
    """Episodes evaluated in all (exactly this many, whatever the number of envs or workers)."""
    n_envs: int = 1
    """Envs stepped together in one process (one batched policy query per step)."""
    max_episode_steps: int = 300
    """Steps after which an episode ends unsuccessful."""
    seed: int = 0
    """Episode k starts from ``reset(seed=seed + k)``."""
    hdf5_path: str | None = None
    """Recorded demos (HDF5) whose initial states the episodes start from."""
    demo_indices: list[int] | None = None
    """With ``hdf5_path``: episode k starts from demo ``demo_indices[k % len]``'s initial state, and the policy
    is reset with that ``demo_index`` (a replay server then replays that demo, found through its demo map)."""
    shared_initial_states: bool = True
    """Draw each episode's initial state from one template env (``reset(seed=seed + k)``, then restored into
    the worker env): robosuite draws object sizes when an env is built, so separate env instances differ;
    with one template every episode's start is the same whichever and however many envs run it."""
    video_dir: str | None = None
    """Folder for one MP4 per episode (none without it)."""
    max_videos: int | None = None
    """Videos of the first N episodes only (all by default)."""
    fps: int = 20
    """Frame rate of the videos."""
    progress: bool = True
    """Show a progress bar and one line per finished episode."""

    def __post_init__(self) -> None:
        for name in ("n_episodes", "n_envs", "max_episode_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.demo_indices is not None and not self.hdf5_path:
            raise ConfigError("demo_indices need hdf5_path (the recorded demos to start from)")
        if self.hdf5_path and not self.demo_indices:
            self.demo_indices = [0]


@dataclass
class EpisodeResult:
    """One evaluated episode."""

    episode: int
    seed: int
    success: bool
    steps: int
    reward: float
    env_id: int
    demo_index: int | None = None
    video: str | None = None
    worker: int | None = None
    """The distributed worker that ran it (None in a single-process rollout)."""
    jerk_boundary: float | None = None
    """J_B: mean jerk of the executed actions at chunk boundaries (see :mod:`policyserve.eval.smoothness`)."""
    jerk_inner: float | None = None
    """J_I: mean jerk of the executed actions inside chunks."""
    jerk_ratio: float | None = None
    """J_B / J_I."""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["return"] = data.pop("reward")
        return data


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95 % for z = 1.96); (0, 1) when n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


@dataclass
class RolloutReport:
    """Per-episode results, success rate with its Wilson 95 % interval, mean return and timing."""

    episodes: list[EpisodeResult]
    config: dict[str, Any]
    timing: dict[str, float]

    @property
    def n_episodes(self) -> int:
        return len(self.episodes)

    @property
    def successes(self) -> int:
        return sum(e.success for e in self.episodes)

    @property
    def success_rate(self) -> float:
        return self.successes / self.n_episodes if self.episodes else 0.0

    @property
    def ci95(self) -> tuple[float, float]:
        return wilson_interval(self.successes, self.n_episodes)

    @property
    def mean_return(self) -> float:
        return float(np.mean([e.reward for e in self.episodes])) if self.episodes else 0.0

    @property
    def mean_steps(self) -> float:
        return float(np.mean([e.steps for e in self.episodes])) if self.episodes else 0.0

    @property
    def mean_steps_to_success(self) -> float | None:
        """Mean steps of the successful episodes (an episode ends at its success); None without any."""
        steps = [e.steps for e in self.episodes if e.success]
        return float(np.mean(steps)) if steps else None

    @property
    def smoothness(self) -> Smoothness:
        """Mean J_B and J_I over the episodes."""
        return mean_smoothness([Smoothness(math.nan if e.jerk_boundary is None else e.jerk_boundary,
                                           math.nan if e.jerk_inner is None else e.jerk_inner)
                                for e in self.episodes])

    def to_dict(self) -> dict[str, Any]:
        return {
            "success_rate": self.success_rate,
            "ci95": list(self.ci95),
            "successes": self.successes,
            "n_episodes": self.n_episodes,
            "mean_return": self.mean_return,
            "mean_steps": self.mean_steps,
            "mean_steps_to_success": self.mean_steps_to_success,
            **self.smoothness.to_json(),
            "episodes": [e.to_dict() for e in self.episodes],
            "timing": self.timing,
            "config": self.config,
            "seeds": {"episodes": f"{self.config.get('seed')} + k",
                      "policy": (self.config.get("action_options") or {}).get("seed"),
                      "policy_queries": "query_seed(policy, episode seed, k) for an episode's k-th query"},
        }

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    def summary(self) -> str:
        lo, hi = self.ci95
        jerk = self.smoothness
        return (f"success rate: {self.success_rate:.3f} ({self.successes}/{self.n_episodes}, 95% CI "
                f"[{lo:.3f}, {hi:.3f}]), mean return {self.mean_return:.3f}, mean steps {self.mean_steps:.1f}, "
                f"jerk at chunk boundaries {jerk.boundary:.4f} / inside chunks {jerk.inner:.4f}")


def config_dict(*configs: Any) -> dict[str, Any]:
    """The fields of evaluation configs as one flat JSON-ready dict (env and driver fields inlined, the env's as
    :meth:`~policyserve.eval.envs.EnvConfig.to_dict` gives them; an env left to be resolved from the data adds
    none)."""
    data: dict[str, Any] = {}
    for config in configs:
        for key, value in asdict(config).items():
            if key == "env" and value is not None:
                data.update(config.env.to_dict())
            elif key in ("env", "driver"):
                data.update(value or {})
            else:
                data[key] = value
    return data


@dataclass
class _Slot:
    """The episode an env is running."""

    result: EpisodeResult
    writer: VideoWriter | None = None
    text: str = ""
    actions: list[np.ndarray] = field(default_factory=list)
    """Executed actions, for the smoothness metrics."""
    sources: list[int] = field(default_factory=list)
    """Which reply (or stretch of holding still) each executed action came from."""


def print_progress(bar: Any, result: EpisodeResult, done: Sequence[EpisodeResult]) -> None:
    """Advance a rollout's progress bar by one finished episode and print its line (``done`` includes it)."""
    if bar is None:
        return
    bar.update(1)
    bar.set_postfix(success=f"{sum(r.success for r in done)}/{len(done)}")
    bar.write(f"episode {result.episode}: success={result.success} steps={result.steps} return={result.reward:.2f}")


class RolloutRunner:
    """The envs of one rollout process (an :class:`~policyserve.sim.vector.EnvBatch`), the driver stepping them,
    and the episode each env runs. Each step, the batch stacks the busy envs' observations once and the driver
    answers one batched query.

    Episodes are run by index (``run`` or ``advance``): episode ``k`` starts from the state built for ``k``
    alone, so any runner (in this process or a distributed worker) gives the same result for it.
    """

    def __init__(self, driver: PolicyDriver, config: RolloutConfig, envs: EnvBatch,
                 template: Any | None = None) -> None:
        self.driver, self.config, self.envs, self.template = driver, config, envs, template
        self.n_envs = envs.num_envs
        self.keys = driver.adapter.resolved.env_keys()
        self.slots: list[_Slot | None] = [None] * self.n_envs
        self.results: list[EpisodeResult] = []
        self.queue: deque[int] = deque()
        self.env_time = 0.0
        self.env_steps = 0
        self.bar: Any = None
        self.demos = DemoFile(config.hdf5_path) if config.demo_indices and config.hdf5_path else None
        self.unchecked: dict[int, int] = {}
        """Env -> the demo its new episode started from, until the policy's first reply for it was checked."""
        self.camera_checked = False
        """Whether the env's camera size was checked against the one the policy declares (after its first reply)."""

    def start_episode(self, env_id: int) -> None:
        """Give env ``env_id`` the next queued episode (reset it and the driver for it), or mark it idle."""
        cfg = self.config
        if not self.queue:
            self.slots[env_id] = None
            return
        k = self.queue.popleft()
        env = self.envs.envs[env_id]
        seed = cfg.seed + k
        demo = None
        t0 = time.perf_counter()
        if self.demos is not None and cfg.demo_indices:
            demo = cfg.demo_indices[k % len(cfg.demo_indices)]
            info = self.envs.reset(env_id, seed=seed, state=self.demos.state(demo, 0))
            self.driver.reset([env_id], demo_reset_options(demo, 0), seeds=seed)
            self.unchecked[env_id] = demo
        else:
            if self.template is not None:
                self.template.reset(seed=seed)
                info = self.envs.reset(env_id, seed=seed, state=self.template.get_state())
            else:
                info = self.envs.reset(env_id, seed=seed)
            self.driver.reset([env_id], seeds=seed)
        self.env_time += time.perf_counter() - t0
        result = EpisodeResult(k, seed, bool(info.get("success", False)), 0, 0.0, env_id, demo)
        obs = self.envs.last[env_id]
        slot = _Slot(result, text=str(getattr(env.unwrapped, "task_description", obs.get("task", ""))))
        if cfg.video_dir and (cfg.max_videos is None or k < cfg.max_videos):
            slot.writer = VideoWriter(Path(cfg.video_dir) / f"episode_{k:03d}.mp4", fps=cfg.fps)
        self.slots[env_id] = slot
        self._record_frame(env_id, slot)

    def _record_frame(self, env_id: int, slot: _Slot) -> None:
        if slot.writer is None:
            return
        obs = self.envs.last[env_id]
        images = [obs[c] for c in self.config.env.camera_names if c in obs]
        if images:
            r = slot.result
            slot.writer.write(compose_frame(images, [slot.text, f"ep {r.episode} step {r.steps} "
                                                                 f"success {int(r.success)}"]))

    def finish_episode(self, env_id: int) -> None:
        slot = self.slots[env_id]
        assert slot is not None
        result = slot.result
        jerk = smoothness(np.reshape(slot.actions, (len(slot.actions), -1)), slot.sources).to_json()
        result.jerk_boundary, result.jerk_inner, result.jerk_ratio = (
            jerk["jerk_boundary"], jerk["jerk_inner"], jerk["jerk_ratio"])
        if slot.writer is not None:
            slot.writer.close()
            final = slot.writer.path.with_name(f"episode_{result.episode:03d}_s{int(result.success)}.mp4")
            if slot.writer.num_frames:
                slot.writer.path.replace(final)
                result.video = str(final)
        self.results.append(result)
        print_progress(self.bar, result, self.results)
        self.start_episode(env_id)

    def step_env(self, env_id: int, action: np.ndarray) -> None:
        slot = self.slots[env_id]
        assert slot is not None
        t0 = time.perf_counter()
        reward, terminated, truncated, info = self.envs.step(env_id, action)
        self.env_time += time.perf_counter() - t0
        self.env_steps += 1
        r = slot.result
        r.steps += 1
        r.reward += float(reward)
        r.success = r.success or bool(info.get("success", False))
        self._record_frame(env_id, slot)
        if terminated or truncated or r.steps >= self.config.max_episode_steps:
            self.finish_episode(env_id)

    def _fill(self, episodes: Sequence[int]) -> None:
        self.queue.extend(int(k) for k in episodes)
        for env_id in range(self.n_envs):
            if self.slots[env_id] is None:
                self.start_episode(env_id)

    def _step_all(self) -> bool:
        """One step of every busy env; False when no env is busy."""
        active = [s is not None for s in self.slots]
        if not any(active):
            return False
        actions = self.driver.act(self.envs.observation(self.keys), active)
        if not self.camera_checked:
            self.camera_checked = True
            warn_camera_size(self.config.env.camera_size, self.driver.policy, self.driver.reset_info)
        for env_id in [i for i in self.unchecked if active[i]]:
            self._check_replay(env_id, actions[env_id])
        for env_id in np.flatnonzero(active):
            slot = self.slots[env_id]
            assert slot is not None
            slot.actions.append(np.array(actions[env_id], dtype=np.float64))
            slot.sources.append(self.driver.last_sources[env_id])
            self.step_env(int(env_id), actions[env_id])
        return True

    def _check_replay(self, env_id: int, action: np.ndarray) -> None:
        """A replay's first reply for env ``env_id``'s new episode must replay the demo it started from."""
        demo = self.unchecked.pop(env_id)
        info = self.driver.last_info
        if info.get("replay") is not True or self.demos is None:
            return  # a model: nothing replays the demo
        steps = info.get("current_step")
        step = steps[env_id] if isinstance(steps, list) and len(steps) > env_id else steps
        where = str(getattr(self.driver.policy, "address", type(self.driver.policy).__name__))
        check_replay_identity(self.demos, demo, 0, info, action if step == 0 else None, where, env=env_id)

    def run(self, episodes: Sequence[int]) -> list[EpisodeResult]:
        """Run ``episodes`` (indices) to the end, envs taking the next one as they free up; sorted results."""
        self._fill(episodes)
        while self._step_all():
            pass
        return sorted(self.results, key=lambda r: r.episode)

    def advance(self, episodes: Sequence[int] = ()) -> list[EpisodeResult]:
        """Queue ``episodes``, then step until at least one episode finishes; returns the ones that finished.

        Returns ``[]`` only when no episode is running or queued.
        """
        self._fill(episodes)
        before = len(self.results)
        while len(self.results) == before and self._step_all():
            pass
        return self.results[before:]

    def stats(self) -> dict[str, float]:
        """Env steps and time, policy queries and time of this runner so far."""
        s = self.driver.stats
        return {"env_steps": self.env_steps, "env_time_s": self.env_time, "policy_queries": s.queries,
                "policy_time_s": s.policy_time_s, "policy_wait_s": s.wait_time_s}

    def close(self) -> None:
        for slot in self.slots:
            if slot is not None and slot.writer is not None:
                slot.writer.close()


def rollout_timing(wall: float, stats: dict[str, float]) -> dict[str, float]:
    """The report's ``timing``: wall time, env steps per second and policy shares from :meth:`RolloutRunner.stats`."""
    return {
        "wall_s": wall,
        "env_steps": stats["env_steps"],
        "env_steps_per_s": stats["env_steps"] / wall if wall > 0 else 0.0,
        "policy_queries": stats["policy_queries"],
        "policy_time_s": stats["policy_time_s"],
        "policy_share": stats["policy_time_s"] / wall if wall > 0 else 0.0,
        "policy_wait_s": stats["policy_wait_s"],
        "policy_wait_share": stats["policy_wait_s"] / wall if wall > 0 else 0.0,
        "env_time_s": stats["env_time_s"],
    }


@contextmanager
def open_runner(policy: BasePolicy, config: RolloutConfig, n_envs: int, *,
                envs: Sequence[Any] | EnvBatch | None = None, owns_policy: bool = False) -> Iterator[RolloutRunner]:
    """A :class:`RolloutRunner` over ``n_envs`` envs built from ``config`` (or the given ``envs``); closes the
    envs it built and the driver (and the policy with ``owns_policy``) on exit."""
    if config.demo_indices and config.hdf5_path:
        demos = DemoFile(config.hdf5_path)
        demo_env_settings(demos, config.env.task, config.env.camera_size)  # a conflicting task or size: an error
        for demo in dict.fromkeys(config.demo_indices):
            demos.check_step(demo, 0)
    driver_config = config.driver
    if envs is None and not driver_config.hold_zero_dims:  # our Franka envs: dims 0-5 are deltas
        driver_config = replace(driver_config, hold_zero_dims=FRANKA_DELTA_DIMS)
    driver = PolicyDriver(policy, n_envs, driver_config, owns_policy=owns_policy)
    own_envs: list[Any] = []
    try:
        if envs is None:
            batch = make_envs(config.env, n_envs, video_keys=driver.adapter.video_keys,
                              key_map=config.driver.key_map, videos=bool(config.video_dir),
                              max_episode_steps=config.max_episode_steps)
            own_envs += batch.envs
        else:
            batch = EnvBatch((envs.envs if isinstance(envs, EnvBatch) else list(envs))[:n_envs])
        template = None
        if own_envs and config.shared_initial_states and not config.demo_indices:
            from ..sim.envs import make_env

            template = make_env(config.env.task, **config.env.sim.kwargs(camera_names=(),
                                                                       max_episode_steps=config.max_episode_steps))
            own_envs.append(template)
            # Built now, from ``seed``: the objects it draws at build time then do not depend on which episode
            # this process happens to run first.
            template.reset(seed=config.seed)
        driver.action_dim = int(batch.single_action_space.shape[0])
        runner = RolloutRunner(driver, config, batch, template)
        try:
            yield runner
        finally:
            runner.close()
    finally:
        driver.close()
        for env in own_envs:
            env.close()


def run_rollout(policy: BasePolicy, config: RolloutConfig, *, envs: Sequence[Any] | None = None,
                report_path: str | Path | None = None) -> RolloutReport:
    """Evaluate ``policy`` for exactly ``config.n_episodes`` episodes; optionally write the JSON report.

    ``policy`` is any :class:`BasePolicy`: a :class:`~policyserve.client.policy_client.PolicyClient` or a local
    policy. ``envs`` (Franka envs: a list or an :class:`~policyserve.sim.vector.EnvBatch`) overrides the ones built from ``config`` (at most
    ``n_episodes`` of them are used); envs passed in are not closed. To run the episodes on a Ray cluster,
    see :func:`policyserve.eval.distributed.run_distributed_rollout`.
    """
    with open_runner(policy, config, min(config.n_envs, config.n_episodes), envs=envs) as runner:
        start = time.perf_counter()
        try:
            if config.progress:
                from tqdm.auto import tqdm

                runner.bar = tqdm(total=config.n_episodes, desc=f"rollout {config.env.task}", unit="ep")
            results = runner.run(range(config.n_episodes))
        finally:
            if runner.bar is not None:
                runner.bar.close()
        wall = time.perf_counter() - start
        stats = runner.stats()
    report = RolloutReport(results, config_dict(config), rollout_timing(wall, stats))
    if report_path is not None:
        report.save_json(report_path)
    return report
