"""Closed-loop evaluation of a policy (local or behind a server) in the Franka envs.

``run_rollout(policy, RolloutConfig(...)) -> RolloutReport``. ``n_envs`` envs are stepped in lockstep in
this process; each policy query is one batch over all envs. Episode ``k`` (0-based) is seeded
``seed + k`` (or starts from demo ``demo_indices[k]``'s recorded initial state), whichever env runs it,
and episodes are handed to envs as they free up until exactly ``n_episodes`` have run, so a
deterministic policy gives the same per-episode results for any ``n_envs``.

Chunks are executed with a receding horizon (see :mod:`policyserve.eval.chunking`). All running envs
query together: an env that finishes mid-chunk is reset at once and waits (without stepping) for the
others to use up their chunk, then gets a fresh chunk in the next batched query. Before that query the
policy is ``reset`` with ``{"env_ids": [...]}`` for the envs that started a new episode (plus per-env
``episode_index``/``step_index`` lists when replaying demos), so stateful policies (replay, scripted
experts) start each episode fresh without disturbing the other envs.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..policies.base import BasePolicy
from .adapter import EnvPolicyAdapter, KeyMap
from .chunking import ActionChunker, ChunkingConfig
from .video import VideoWriter, compose_frame


@dataclass
class RolloutConfig:
    """What to evaluate and how (see module docstring)."""

    task: str = "lift"
    n_episodes: int = 10
    n_envs: int = 1
    n_action_steps: int = 8
    max_episode_steps: int = 300
    seed: int = 0
    ensemble_coef: float | None = None
    camera_names: tuple[str, ...] = ("table_cam", "wrist_cam")
    camera_size: tuple[int, int] = (128, 128)
    render_settings: str = "fast"
    key_map: KeyMap = field(default_factory=KeyMap)
    action_options: dict[str, Any] | None = None
    """Options sent with every ``get_action`` (e.g. ``{"seed": 0}`` for a deterministic model server)."""
    hdf5_path: str | None = None
    demo_indices: list[int] | None = None
    """With ``hdf5_path``: episode k starts from demo ``demo_indices[k % len]``'s initial state, and the policy
    is reset with that ``episode_index`` (a replay server then replays that demo)."""
    shared_initial_states: bool = True
    """Draw each episode's initial state from one template env (``reset(seed=seed + k)``, then restored into
    the worker env): robosuite draws object sizes when an env is built, so separate env instances differ;
    with one template every episode's start is the same whichever and however many envs run it."""
    video_dir: str | None = None
    max_videos: int | None = None
    fps: int = 20
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("n_episodes", "n_envs", "n_action_steps", "max_episode_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.demo_indices is not None and not self.hdf5_path:
            raise ConfigError("demo_indices need hdf5_path (the recorded demos to start from)")
        if self.hdf5_path and not self.demo_indices:
            self.demo_indices = [0]
        self.camera_names = tuple(self.camera_names)
        self.camera_size = (int(self.camera_size[0]), int(self.camera_size[1]))


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "success_rate": self.success_rate,
            "ci95": list(self.ci95),
            "successes": self.successes,
            "n_episodes": self.n_episodes,
            "mean_return": self.mean_return,
            "mean_steps": self.mean_steps,
            "episodes": [e.to_dict() for e in self.episodes],
            "timing": self.timing,
            "config": self.config,
        }

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    def summary(self) -> str:
        lo, hi = self.ci95
        return (f"success rate: {self.success_rate:.3f} ({self.successes}/{self.n_episodes}, 95% CI "
                f"[{lo:.3f}, {hi:.3f}]), mean return {self.mean_return:.3f}, mean steps {self.mean_steps:.1f}")


def _config_dict(config: RolloutConfig) -> dict[str, Any]:
    data = asdict(config)
    data["key_map"] = asdict(config.key_map)
    return data


@dataclass
class _Slot:
    """The episode an env is running."""

    result: EpisodeResult
    writer: VideoWriter | None = None
    text: str = ""


class _Runner:
    """State of one rollout: envs, adapter, chunker, the episode each env runs, timing."""

    def __init__(self, policy: BasePolicy, config: RolloutConfig, envs: Sequence[Any],
                 template: Any | None = None) -> None:
        self.policy, self.config, self.envs, self.template = policy, config, list(envs), template
        self.n_envs = len(self.envs)
        self.adapter = EnvPolicyAdapter(policy.get_modality_config(), self.n_envs, config.key_map)
        self.chunker = ActionChunker(self.n_envs, ChunkingConfig(config.n_action_steps, config.ensemble_coef))
        self.action_dim = int(self.envs[0].action_space.shape[0])
        self.slots: list[_Slot | None] = [None] * self.n_envs
        self.results: list[EpisodeResult] = []
        self.next_episode = 0
        self.pending_resets: set[int] = set()
        self.demo_of_env: list[int] = [0] * self.n_envs
        self.episode_lengths: list[int] | None = None
        self.policy_time = self.env_time = 0.0
        self.queries = self.env_steps = 0
        self.bar: Any = None

    # ---------------------------------------------------------------- episodes
    def _initial_state(self, demo_index: int) -> dict[str, Any]:
        from ..sim.recorder import load_demo_state

        return load_demo_state(self.config.hdf5_path, demo_index, 0)

    def start_episode(self, env_id: int) -> None:
        """Give env ``env_id`` the next episode (reset it), or mark it idle when all have been handed out."""
        cfg = self.config
        if self.next_episode >= cfg.n_episodes:
            self.slots[env_id] = None
            return
        k = self.next_episode
        self.next_episode += 1
        env = self.envs[env_id]
        seed = cfg.seed + k
        demo = None
        t0 = time.perf_counter()
        if cfg.demo_indices:
            demo = cfg.demo_indices[k % len(cfg.demo_indices)]
            self.demo_of_env[env_id] = demo
            obs, info = env.reset(seed=seed, options={"state": self._initial_state(demo)})
        elif self.template is not None:
            self.template.reset(seed=seed)
            obs, info = env.reset(seed=seed, options={"state": self.template.get_state()})
        else:
            obs, info = env.reset(seed=seed)
        self.env_time += time.perf_counter() - t0
        self.adapter.reset([env_id])
        self.adapter.push(obs, env_id)
        self.chunker.reset([env_id])
        self.pending_resets.add(env_id)
        result = EpisodeResult(k, seed, bool(info.get("success", False)), 0, 0.0, env_id, demo)
        slot = _Slot(result, text=str(getattr(env.unwrapped, "task_description", obs.get("task", ""))))
        if cfg.video_dir and (cfg.max_videos is None or k < cfg.max_videos):
            slot.writer = VideoWriter(Path(cfg.video_dir) / f"episode_{k:03d}.mp4", fps=cfg.fps)
        self.slots[env_id] = slot
        self._record_frame(slot, obs)

    def _record_frame(self, slot: _Slot, obs: dict[str, Any]) -> None:
        if slot.writer is None:
            return
        images = [obs[c] for c in self.config.camera_names if c in obs]
        if images:
            r = slot.result
            slot.writer.write(compose_frame(images, [slot.text, f"ep {r.episode} step {r.steps} "
                                                                 f"success {int(r.success)}"]))

    def finish_episode(self, env_id: int) -> None:
        slot = self.slots[env_id]
        assert slot is not None
        result = slot.result
        if slot.writer is not None:
            slot.writer.close()
            final = slot.writer.path.with_name(f"episode_{result.episode:03d}_s{int(result.success)}.mp4")
            if slot.writer.frames:
                slot.writer.path.replace(final)
                result.video = str(final)
        self.results.append(result)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(success=f"{sum(r.success for r in self.results)}/{len(self.results)}")
            self.bar.write(f"episode {result.episode}: success={result.success} steps={result.steps} "
                           f"return={result.reward:.2f}")
        self.start_episode(env_id)

    # ---------------------------------------------------------------- policy
    def reset_options(self, env_ids: list[int]) -> dict[str, Any]:
        """Per-env reset options: ``env_ids``, plus replay positions of every env when starting from demos."""
        options: dict[str, Any] = {"env_ids": env_ids}
        if self.config.demo_indices:
            steps = []
            for i, slot in enumerate(self.slots):
                step = 0 if slot is None or i in env_ids else slot.result.steps
                if self.episode_lengths is not None:
                    step = min(step, self.episode_lengths[i] - 1)
                steps.append(step)
            options["episode_index"] = list(self.demo_of_env)
            options["step_index"] = steps
        return options

    def query(self) -> None:
        """One batched ``get_action`` for all envs; running envs get a fresh chunk."""
        if self.pending_resets:
            self.policy.reset(self.reset_options(sorted(self.pending_resets)))
            self.pending_resets.clear()
        observation = self.adapter.build()
        t0 = time.perf_counter()
        action, info = self.policy.get_action(observation, self.config.action_options)
        self.policy_time += time.perf_counter() - t0
        self.queries += 1
        lengths = info.get("episode_length") if isinstance(info, dict) else None
        if isinstance(lengths, list) and len(lengths) == self.n_envs:
            self.episode_lengths = [int(n) for n in lengths]
        chunks = self.adapter.to_env_actions(action, self.action_dim)
        self.chunker.set_chunks(chunks, [i for i, s in enumerate(self.slots) if s is not None])

    # ---------------------------------------------------------------- loop
    def step_env(self, env_id: int) -> None:
        slot = self.slots[env_id]
        assert slot is not None
        action = self.chunker.pop(env_id)
        t0 = time.perf_counter()
        obs, reward, terminated, truncated, info = self.envs[env_id].step(action)
        self.env_time += time.perf_counter() - t0
        self.env_steps += 1
        r = slot.result
        r.steps += 1
        r.reward += float(reward)
        r.success = r.success or bool(info.get("success", False))
        self._record_frame(slot, obs)
        if terminated or truncated or r.steps >= self.config.max_episode_steps:
            self.finish_episode(env_id)
        else:
            self.adapter.push(obs, env_id)

    def run(self) -> list[EpisodeResult]:
        for env_id in range(self.n_envs):
            self.start_episode(env_id)
        while True:
            running = [i for i, s in enumerate(self.slots) if s is not None]
            if not running:
                break
            if self.chunker.needs_query(running):
                self.query()
            for env_id in running:
                if self.chunker.remaining(env_id) > 0:
                    self.step_env(env_id)
        return sorted(self.results, key=lambda r: r.episode)

    def close(self) -> None:
        for slot in self.slots:
            if slot is not None and slot.writer is not None:
                slot.writer.close()


def make_envs(config: RolloutConfig, video_keys: Sequence[str] = (), n_envs: int | None = None) -> list[Any]:
    """``n_envs`` Franka envs rendering only the cameras the policy (``video_keys``, mapped) or videos need."""
    from ..sim.envs import CAMERAS, make_env

    cams = [config.key_map.env_key("video", k) for k in video_keys]
    if config.video_dir:
        cams += list(config.camera_names)
    cams = [c for c in dict.fromkeys(cams) if c in CAMERAS]
    return [
        make_env(config.task, camera_names=tuple(cams), camera_size=config.camera_size,
                 max_episode_steps=config.max_episode_steps, terminate_on_success=True,
                 render_settings=config.render_settings)
        for _ in range(n_envs or config.n_envs)
    ]


def run_rollout(policy: BasePolicy, config: RolloutConfig, *, envs: Sequence[Any] | None = None,
                report_path: str | Path | None = None) -> RolloutReport:
    """Evaluate ``policy`` for exactly ``config.n_episodes`` episodes; optionally write the JSON report.

    ``policy`` is any :class:`BasePolicy`: a :class:`~policyserve.protocol.client.PolicyClient` or a local
    policy. ``envs`` (a list of Franka envs) overrides the ones built from ``config`` (at most
    ``n_episodes`` of them are used); envs passed in are not closed.
    """
    from ..registry import parse_modality_configs

    configs = parse_modality_configs(dict(policy.get_modality_config()), "policy modality config")
    n_envs = min(config.n_envs, config.n_episodes)
    own_envs = envs is None
    env_list = make_envs(config, configs["video"].modality_keys, n_envs) if envs is None else list(envs)[:n_envs]
    template = None
    if own_envs and config.shared_initial_states and not config.demo_indices:
        from ..sim.envs import make_env

        template = make_env(config.task, camera_names=(), max_episode_steps=config.max_episode_steps)
    runner = _Runner(policy, config, env_list, template)
    start = time.perf_counter()
    try:
        if config.progress:
            from tqdm.auto import tqdm

            runner.bar = tqdm(total=config.n_episodes, desc=f"rollout {config.task}", unit="ep")
        results = runner.run()
    finally:
        runner.close()
        if runner.bar is not None:
            runner.bar.close()
        if own_envs:
            for env in env_list + ([template] if template is not None else []):
                env.close()
    wall = time.perf_counter() - start
    timing = {
        "wall_s": wall,
        "env_steps": runner.env_steps,
        "env_steps_per_s": runner.env_steps / wall if wall > 0 else 0.0,
        "policy_queries": runner.queries,
        "policy_time_s": runner.policy_time,
        "policy_share": runner.policy_time / wall if wall > 0 else 0.0,
        "env_time_s": runner.env_time,
    }
    report = RolloutReport(results, _config_dict(config), timing)
    if report_path is not None:
        report.save_json(report_path)
    return report
