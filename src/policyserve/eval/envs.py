"""The env setup shared by rollout and comparison: which Franka task, cameras and render settings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..client.adapter import KeyMap


@dataclass
class EnvConfig:
    """The Franka envs an evaluation builds."""

    task: str = "lift"
    camera_names: tuple[str, ...] = ("table_cam", "wrist_cam")
    """Cameras shown in the videos (the policy's cameras are rendered whether listed or not)."""
    camera_size: tuple[int, int] = (128, 128)
    render_settings: str = "fast"

    def __post_init__(self) -> None:
        self.camera_names = tuple(self.camera_names)
        self.camera_size = (int(self.camera_size[0]), int(self.camera_size[1]))


def make_envs(config: EnvConfig, n_envs: int, *, video_keys: Sequence[str] = (), key_map: KeyMap | None = None,
              videos: bool = False, max_episode_steps: int | None = None,
              terminate_on_success: bool = True) -> list[Any]:
    """``n_envs`` Franka envs rendering only the cameras the policy's ``video_keys`` (through ``key_map``) and,
    with ``videos``, ``config.camera_names`` need."""
    from ..sim.envs import CAMERAS, make_env

    key_map = key_map or KeyMap()
    cams = [key_map.env_key("video", k) for k in video_keys] + (list(config.camera_names) if videos else [])
    cams = [c for c in dict.fromkeys(cams) if c in CAMERAS]
    return [
        make_env(config.task, camera_names=tuple(cams), camera_size=config.camera_size,
                 max_episode_steps=max_episode_steps, terminate_on_success=terminate_on_success,
                 render_settings=config.render_settings)
        for _ in range(n_envs)
    ]


def batch_observations(observations: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    """One observation dict per env -> one batched dict of ``keys`` (arrays stacked env-first, texts listed)."""
    batched: dict[str, Any] = {}
    for key in keys:
        values = [obs[key] for obs in observations if key in obs]
        if len(values) != len(observations):
            continue  # the driver names the missing key
        batched[key] = list(values) if isinstance(values[0], (str, bytes)) else np.stack(values)
    return batched
