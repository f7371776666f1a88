"""The env setup shared by rollout and comparison: which Franka task, cameras and render settings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..client.keymap import KeyMap

if TYPE_CHECKING:
    from ..sim.vector import EnvBatch


@dataclass
class EnvConfig:
    """The Franka envs an evaluation builds."""

    task: str = "lift"
    """Franka task: lift or stack."""
    camera_names: tuple[str, ...] = ("table_cam", "wrist_cam")
    """Cameras shown in the videos (the policy's cameras are rendered whether listed or not)."""
    camera_size: tuple[int, int] = (128, 128)
    """Rendered image size (height, width) of every camera."""
    render_settings: str = "fast"
    """Renderer preset: fast or default."""

    def __post_init__(self) -> None:
        self.camera_names = tuple(self.camera_names)
        self.camera_size = (int(self.camera_size[0]), int(self.camera_size[1]))


def make_envs(config: EnvConfig, n_envs: int, *, video_keys: Sequence[str] = (), key_map: KeyMap | None = None,
              videos: bool = False, max_episode_steps: int | None = None,
              terminate_on_success: bool = True) -> EnvBatch:
    """``n_envs`` Franka envs (one :class:`~policyserve.sim.vector.EnvBatch`) rendering only the cameras the
    policy's ``video_keys`` (through ``key_map``) and, with ``videos``, ``config.camera_names`` need."""
    from ..sim.envs import CAMERAS
    from ..sim.vector import make_env_batch

    key_map = key_map or KeyMap()
    cams = [key_map.env_key("video", k) for k in video_keys] + (list(config.camera_names) if videos else [])
    cams = [c for c in dict.fromkeys(cams) if c in CAMERAS]
    return make_env_batch(config.task, n_envs, camera_names=tuple(cams), camera_size=config.camera_size,
                          max_episode_steps=max_episode_steps, terminate_on_success=terminate_on_success,
                          render_settings=config.render_settings)
