"""The env setup shared by rollout and comparison: which Franka task, and the sim config of its envs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..client.keymap import KeyMap
from ..sim.envs import FrankaEnvConfig
from ..sim.render import RenderSettings, render_settings_name

if TYPE_CHECKING:
    from ..sim.vector import EnvBatch


@dataclass
class EnvConfig:
    """The Franka envs an evaluation builds: a task and the :class:`~policyserve.sim.envs.FrankaEnvConfig` of
    its envs (cameras, camera size, render settings, ...)."""

    task: str = "lift"
    """Franka task: lift or stack."""
    sim: FrankaEnvConfig = field(default_factory=lambda: FrankaEnvConfig(camera_size=(128, 128)))
    """The envs' sim config. Its ``camera_names`` are the cameras shown in the videos (the policy's cameras are
    rendered whether listed or not); ``max_episode_steps`` and ``terminate_on_success`` apply where
    :func:`make_envs` is given none."""

    @property
    def camera_names(self) -> tuple[str, ...]:
        """Cameras shown in the videos (``sim.camera_names``)."""
        return self.sim.camera_names

    @property
    def camera_size(self) -> tuple[int, int]:
        """Rendered image size (height, width) of every camera (``sim.camera_size``)."""
        return self.sim.camera_size

    @property
    def render_settings(self) -> RenderSettings:
        """Renderer settings (``sim.render_settings``, resolved from its preset name)."""
        return self.sim.render_settings  # type: ignore[return-value]  # resolved by FrankaEnvConfig

    def to_dict(self) -> dict[str, Any]:
        """The env section of a report: task, cameras, camera size, render settings (preset name), control
        frequency and model seed, at the top level (the per-run episode limit and seeds are the run's)."""
        return {"task": self.task, "camera_names": self.camera_names, "camera_size": self.camera_size,
                "render_settings": render_settings_name(self.sim.render_settings),
                "control_freq": self.sim.control_freq, "model_seed": self.sim.model_seed}


def make_envs(config: EnvConfig, n_envs: int, *, video_keys: Sequence[str] = (), key_map: KeyMap | None = None,
              videos: bool = False, max_episode_steps: int | None = None,
              terminate_on_success: bool | None = None) -> EnvBatch:
    """``n_envs`` Franka envs (one :class:`~policyserve.sim.vector.EnvBatch`) built from ``config.sim``, rendering
    only the cameras the policy's ``video_keys`` (through ``key_map``) and, with ``videos``, ``config.camera_names``
    need; ``max_episode_steps`` and ``terminate_on_success`` (when given) replace the sim config's."""
    from ..sim.envs import CAMERAS
    from ..sim.vector import make_env_batch

    key_map = key_map or KeyMap()
    cams = [key_map.env_key("video", k) for k in video_keys] + (list(config.camera_names) if videos else [])
    changes: dict[str, Any] = {"camera_names": tuple(c for c in dict.fromkeys(cams) if c in CAMERAS)}
    if max_episode_steps is not None:
        changes["max_episode_steps"] = max_episode_steps
    if terminate_on_success is not None:
        changes["terminate_on_success"] = terminate_on_success
    return make_env_batch(config.task, n_envs, config.sim, **changes)
