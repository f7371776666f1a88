"""Record scripted-expert demonstrations to robomimic-layout HDF5, and read states back.

Layout::

    data/                         attrs: env_args (JSON), total (int), task (str), num_demos (int)
      demo_N/                     attrs: num_samples, model_file (XML), initial_joint (float64),
                                         success (bool), seed (int)
        actions        (T, 7)     float32, in [-1, 1]
        states         (T, S)     float64 flattened sim state before each action
        gripper_actions (T, G)    float64 integrated gripper command before each action
        warmstarts     (T, V)     float64 MuJoCo solver warm start before each action (absent in
                                  files recorded before it was added: those restore with a zero one)
        rewards (T,) float64, dones (T,) uint8
        obs/<key>                 every env observation key but ``task``, before each action
                                  (images uint8 (T, H, W, 3), others float32 (T, D))

Kept demos are numbered demo_0 .. demo_{n-1}. ``load_demo_state`` rebuilds a state dict that
``env.reset(options={"state": ...})`` restores exactly: the observation that reset returns equals the
recorded ``obs`` at that step (``load_demo_obs`` and ``obs_max_abs_diff`` compare them).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data.demos import DemoFile
from ..errors import ConfigError
from .envs import GYM_IDS, CAMERAS, get_task, make_env
from .scripted import ScriptedExpert


@dataclass
class RecordedEpisode:
    """One expert episode being recorded, step-aligned (each entry is taken before its action); written to
    HDF5 by :func:`write_episode` (the LeRobot reader's episode is :class:`policyserve.data.lerobot.Episode`)."""

    seed: int
    initial_joint: np.ndarray
    model_file: str
    actions: list[np.ndarray] = field(default_factory=list)
    states: list[np.ndarray] = field(default_factory=list)
    gripper_actions: list[np.ndarray] = field(default_factory=list)
    warmstarts: list[np.ndarray] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    obs: dict[str, list[np.ndarray]] = field(default_factory=dict)
    success: bool = False

    def __len__(self) -> int:
        return len(self.actions)


def run_expert_episode(env: Any, expert: ScriptedExpert, seed: int) -> RecordedEpisode:
    """Roll ``expert`` in ``env`` from ``reset(seed=seed)`` until the episode ends."""
    obs, info = env.reset(seed=seed)
    start = env.unwrapped.get_state()
    expert.reset()
    episode = RecordedEpisode(seed, start["initial_joint"], start["model_file"])
    done = False
    while not done:
        state = env.unwrapped.get_state()
        action = expert.act(obs)
        episode.states.append(state["states"])
        episode.gripper_actions.append(state["gripper_action"])
        episode.warmstarts.append(state["warmstart"])
        episode.actions.append(action)
        for key, value in obs.items():
            if key != "task":
                episode.obs.setdefault(key, []).append(value)
        obs, reward, terminated, truncated, info = env.step(action)
        episode.rewards.append(reward)
        done = terminated or truncated
    episode.success = bool(info["success"])
    return episode


def write_episode(group: Any, episode: RecordedEpisode) -> None:
    """Write ``episode`` into an (empty) h5py group ``data/demo_N``."""
    n = len(episode)
    group.attrs["num_samples"] = n
    group.attrs["model_file"] = episode.model_file
    group.attrs["initial_joint"] = episode.initial_joint
    group.attrs["success"] = episode.success
    group.attrs["seed"] = episode.seed
    group.create_dataset("actions", data=np.asarray(episode.actions, dtype=np.float32))
    group.create_dataset("states", data=np.asarray(episode.states, dtype=np.float64))
    group.create_dataset("gripper_actions", data=np.asarray(episode.gripper_actions, dtype=np.float64))
    group.create_dataset("warmstarts", data=np.asarray(episode.warmstarts, dtype=np.float64))
    group.create_dataset("rewards", data=np.asarray(episode.rewards, dtype=np.float64))
    dones = np.zeros(n, dtype=np.uint8)
    dones[-1] = 1
    group.create_dataset("dones", data=dones)
    obs = group.create_group("obs")
    for key, values in episode.obs.items():
        arr = np.asarray(values)
        if key in CAMERAS:
            obs.create_dataset(key, data=arr, chunks=(1, *arr.shape[1:]), compression="gzip", compression_opts=4)
        else:
            obs.create_dataset(key, data=arr)


def env_args(task: str, env: Any) -> dict[str, Any]:
    """robomimic-style ``env_args``: env name, type and the kwargs that rebuild the env."""
    cfg = env.unwrapped.config
    spec = get_task(task)
    return {
        "env_name": spec.robosuite_env,
        "type": 1,  # robomimic EnvType.ROBOSUITE_TYPE
        "env_version": "1.5.2",
        "gym_id": GYM_IDS[spec.name],
        "task": spec.name,
        "env_kwargs": {
            "robots": "Panda",
            "camera_names": list(cfg.camera_names),
            "camera_size": list(cfg.camera_size),
            "max_episode_steps": env.unwrapped.max_episode_steps,
            "terminate_on_success": cfg.terminate_on_success,
            "render_settings": asdict(cfg.render_settings),
            "control_freq": cfg.control_freq,
            "model_seed": cfg.model_seed,
            "robosuite_cameras": [CAMERAS[c] for c in cfg.camera_names],
        },
    }


def record_demos(
    task: str,
    n_demos: int,
    output: str | Path,
    *,
    camera_names: tuple[str, ...] = ("table_cam", "wrist_cam"),
    camera_size: tuple[int, int] | int = (128, 128),
    seed: int = 0,
    keep_failed: bool = False,
    max_episode_steps: int | None = None,
    progress: bool = True,
    max_attempts: int | None = None,
    render_settings: str = "fast",
) -> dict[str, Any]:
    """Record ``n_demos`` scripted-expert demos of ``task`` to ``output`` (HDF5, see module doc).

    Episode ``k`` starts from ``reset(seed=seed + k)``. Failed episodes are dropped unless
    ``keep_failed``; at most ``max_attempts`` (default ``3 * n_demos + 10``) episodes are run.
    Returns a summary: output, task, demos, attempts, successes, total_samples, seconds.
    """
    import time

    import h5py
    from tqdm import tqdm

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    max_attempts = max_attempts or 3 * n_demos + 10
    env = make_env(
        task, camera_names=tuple(camera_names), camera_size=camera_size, max_episode_steps=max_episode_steps,
        seed=seed, render_settings=render_settings,
    )
    limit = env.unwrapped.max_episode_steps
    expert = ScriptedExpert(task)
    kept = attempts = successes = total = 0
    started = time.monotonic()
    bar = tqdm(total=n_demos, desc=f"record {task}", unit="demo", disable=not progress)
    try:
        with h5py.File(output, "w") as f:
            data = f.create_group("data")
            while kept < n_demos and attempts < max_attempts:
                episode = run_expert_episode(env, expert, seed + attempts)
                attempts += 1
                successes += episode.success
                if episode.success or keep_failed:
                    write_episode(data.create_group(f"demo_{kept}"), episode)
                    kept += 1
                    total += len(episode)
                    bar.update(1)
                bar.set_postfix(success=f"{successes}/{attempts}")
            data.attrs["env_args"] = json.dumps(env_args(task, env))
            data.attrs["total"] = total
            data.attrs["num_demos"] = kept
            data.attrs["task"] = env.unwrapped.task_description
    finally:
        bar.close()
        env.close()
    if kept == 0:
        output.unlink(missing_ok=True)
        raise ConfigError(
            f"no successful {get_task(task).name} demo in {attempts} attempts of at most "
            f"{limit} steps, so nothing was written to {output}: give episodes more "
            "steps (max_episode_steps) or keep failed episodes (keep_failed)")
    return {
        "output": str(output), "task": get_task(task).name, "demos": kept, "attempts": attempts,
        "successes": successes, "total_samples": total, "seconds": round(time.monotonic() - started, 2),
    }


def load_demo_state(path: str | Path, demo_index: int, step: int = 0) -> dict[str, Any]:
    """State dict of demo ``demo_index`` before action ``step``, for ``env.reset(options={"state": ...})``."""
    return DemoFile(path).state(demo_index, step)


def load_demo_obs(path: str | Path, demo_index: int, step: int = 0) -> dict[str, np.ndarray]:
    """Recorded observation of demo ``demo_index`` before action ``step`` (every key but ``task``)."""
    return DemoFile(path).observation(demo_index, step)


def obs_max_abs_diff(obs: dict[str, Any], recorded: dict[str, np.ndarray]) -> dict[str, float]:
    """Per-key max |obs - recorded| (as float64, so images compare as integers) over the keys both have."""
    diffs = {}
    for key in recorded:
        if key not in obs:
            continue
        value, expected = np.asarray(obs[key], np.float64), np.asarray(recorded[key], np.float64)
        if value.shape != expected.shape:
            raise ValueError(f"observation {key!r}: recorded shape {expected.shape}, env gives {value.shape}")
        diffs[key] = float(np.max(np.abs(value - expected)))
    return diffs
