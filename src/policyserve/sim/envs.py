"""Franka Panda lift and stack gymnasium environments on robosuite (MuJoCo).

Observations are shaped like the seed workflow's IsaacLab Franka env (see :class:`FrankaEnv`), actions
are 7-D delta end-effector poses plus a gripper command, and the robosuite env is built lazily on the
first ``reset`` so that a process that only constructs the env (e.g. gymnasium's vector-env parent)
never holds a GL context.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field, fields
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from . import state as state_lib
from .render import RenderSettings, apply_render_settings, resolve_render_settings

CAMERAS: dict[str, str] = {"table_cam": "agentview", "wrist_cam": "robot0_eye_in_hand"}
"""policyserve camera name -> robosuite camera name."""

ROBOT_OBS: dict[str, tuple[str, int]] = {
    "eef_pos": ("robot0_eef_pos", 3),
    "eef_quat": ("robot0_eef_quat", 4),
    "gripper_pos": ("robot0_gripper_qpos", 2),
    "joint_pos": ("robot0_joint_pos", 7),
    "joint_vel": ("robot0_joint_vel", 7),
}
"""policyserve observation key -> (robosuite observation key, size), for every task."""

ACTION_DIM = 7

_gl_context_created = False


def gl_context_created() -> bool:
    """Whether this process has built an env with an offscreen GL context (forking it then may hang)."""
    return _gl_context_created


@dataclass(frozen=True)
class TaskSpec:
    """One built-in task: robosuite env name, instruction text, default horizon, object observations."""

    name: str
    robosuite_env: str
    description: str
    max_episode_steps: int
    object_obs: dict[str, tuple[str, int]] = field(default_factory=dict)


TASKS: dict[str, TaskSpec] = {
    "lift": TaskSpec(
        "lift", "Lift", "lift the cube", 300,
        {"cube_pos": ("cube_pos", 3), "cube_quat": ("cube_quat", 4)},
    ),
    "stack": TaskSpec(
        "stack", "Stack", "stack the red cube on the green cube", 400,
        {
            "cube_a_pos": ("cubeA_pos", 3), "cube_a_quat": ("cubeA_quat", 4),
            "cube_b_pos": ("cubeB_pos", 3), "cube_b_quat": ("cubeB_quat", 4),
        },
    ),
}

GYM_IDS: dict[str, str] = {"lift": "policyserve/FrankaLift-v0", "stack": "policyserve/FrankaStack-v0"}


def get_task(task: str) -> TaskSpec:
    """Task spec by name ("lift" or "stack", case-insensitive)."""
    try:
        return TASKS[task.lower()]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS)}") from None


@dataclass
class FrankaEnvConfig:
    """Constructor options of :class:`FrankaEnv` (see there)."""

    camera_names: tuple[str, ...] = ("table_cam", "wrist_cam")
    """Cameras rendered into the observations (a subset of table_cam, wrist_cam)."""
    camera_size: tuple[int, int] = (128, 128)
    """Rendered image size (height, width) of every camera."""
    max_episode_steps: int | None = None
    """Steps after which an episode truncates (None: the task's own limit)."""
    terminate_on_success: bool = True
    """End an episode (terminated) on success."""
    render_settings: str | RenderSettings = "fast"
    """Renderer preset (fast or default) or RenderSettings; a preset name resolves to its RenderSettings."""
    seed: int | None = None
    """Seed of the first reset that is given none."""
    control_freq: int = 20
    """Control steps per second."""
    model_seed: int = 0
    """Seed of the model's own randomisation (Lift's cube size), the same for every instance."""

    def __post_init__(self) -> None:
        self.camera_names = tuple(self.camera_names)
        unknown = [c for c in self.camera_names if c not in CAMERAS]
        if unknown:
            raise ValueError(f"unknown cameras {unknown}; expected a subset of {sorted(CAMERAS)}")
        if isinstance(self.camera_size, int):
            self.camera_size = (self.camera_size, self.camera_size)
        self.camera_size = (int(self.camera_size[0]), int(self.camera_size[1]))
        self.render_settings = resolve_render_settings(self.render_settings)

    def kwargs(self, **changes: Any) -> dict[str, Any]:
        """This config as :class:`FrankaEnv` keyword arguments, ``changes`` replacing some."""
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, **changes}


class FrankaEnv(gym.Env):
    """A robosuite Panda task (OSC_POSE arm + gripper, 20 Hz) with the seed's IsaacLab-style observations.

    Observation (dict of numpy arrays, floats are float32):
      ``table_cam``, ``wrist_cam`` (H, W, 3) uint8 upright images (only the configured cameras);
      ``eef_pos`` (3,); ``eef_quat`` (4,) in robosuite's (x, y, z, w) order; ``gripper_pos`` (2,) finger
      joint positions; ``joint_pos`` (7,); ``joint_vel`` (7,); the task's object poses (lift: ``cube_pos``,
      ``cube_quat``; stack: ``cube_a_pos``/``cube_a_quat`` for the red cube to pick, ``cube_b_pos``/
      ``cube_b_quat`` for the green base cube, quaternions xyzw); ``task`` (str) the instruction.

    Action: float32 (7,) in [-1, 1]: (dx, dy, dz, drx, dry, drz, gripper); 1 is 0.05 m / 0.5 rad per step;
    gripper -1 opens, +1 closes.

    ``info["success"]`` is the task's success check after every reset and step. Episodes terminate on
    success when ``terminate_on_success`` and truncate after ``max_episode_steps``.

    Every observation is a function of the simulator state the step (or reset) ends in (see
    :mod:`policyserve.sim.robosuite_env`). ``reset(seed=s)`` gives the same start on every instance:
    the model's own randomisation (Lift's cube size) is drawn once from ``model_seed``, the same for
    all instances (a reset without a state goes back to that model after restoring a state that
    brought another), and the episode's (placement, joint noise) from ``s``; ``seed`` seeds the first
    reset that is given none. ``reset(options={"state": s})`` restores a state from :meth:`get_state`
    exactly, in any instance or process: the restoring reset returns the observation the saving run
    had at that point, and for the same actions the observations that follow are bitwise those of the
    saving run. In a vector env ``options={"states": {vector_index: s, ...}}`` picks this sub-env's
    state.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(
        self,
        task: str,
        *,
        camera_names: tuple[str, ...] | list[str] = ("table_cam", "wrist_cam"),
        camera_size: tuple[int, int] | int = (128, 128),
        max_episode_steps: int | None = None,
        terminate_on_success: bool = True,
        render_settings: str | RenderSettings = "fast",
        seed: int | None = None,
        control_freq: int = 20,
        model_seed: int = 0,
        render_mode: str | None = None,
    ) -> None:
        self.spec_task = get_task(task)
        self.config = FrankaEnvConfig(
            tuple(camera_names), camera_size, max_episode_steps, terminate_on_success, render_settings, seed,
            control_freq, model_seed,
        )
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"unsupported render_mode {render_mode!r}; only 'rgb_array'")
        self.render_mode = render_mode
        self.task_description: str = self.spec_task.description
        self.max_episode_steps: int = max_episode_steps or self.spec_task.max_episode_steps
        self.action_space = spaces.Box(-1.0, 1.0, (ACTION_DIM,), dtype=np.float32)
        self.observation_space = self._build_observation_space()
        self._rs: Any = None
        self._xml: str | None = None  # the XML the current sim was built from
        self._own_xml: str | None = None  # the XML built from model_seed
        self._elapsed = 0
        self._pending_seed = seed
        self.vector_index = 0  # position in a vector env (set by make_vec_env)

    # ------------------------------------------------------------------ construction
    def _build_observation_space(self) -> spaces.Dict:
        h, w = self.config.camera_size
        entries: dict[str, spaces.Space] = {
            cam: spaces.Box(0, 255, (h, w, 3), dtype=np.uint8) for cam in self.config.camera_names
        }
        for key, (_, size) in {**ROBOT_OBS, **self.spec_task.object_obs}.items():
            entries[key] = spaces.Box(-np.inf, np.inf, (size,), dtype=np.float32)
        entries["task"] = spaces.Text(max_length=256, charset=string.printable)
        return spaces.Dict(entries)

    @property
    def robosuite_env(self) -> Any:
        """The underlying robosuite env (built on first use)."""
        self._ensure_built()
        return self._rs

    def _ensure_built(self) -> None:
        if self._rs is not None:
            return
        from . import robosuite_env

        global _gl_context_created
        cfg = self.config
        cams = [CAMERAS[c] for c in cfg.camera_names]
        offscreen = bool(cams) or self.render_mode == "rgb_array"
        h, w = cfg.camera_size
        self._rs = robosuite_env.make(
            self.spec_task.robosuite_env,
            robots="Panda",
            has_renderer=False,
            has_offscreen_renderer=offscreen,
            use_camera_obs=bool(cams),
            camera_names=cams or "agentview",
            camera_heights=h,
            camera_widths=w,
            control_freq=cfg.control_freq,
            horizon=self.max_episode_steps,
            ignore_done=True,
            hard_reset=False,
            reward_shaping=False,
            seed=cfg.model_seed,  # the model's randomisation, drawn while robosuite builds it
        )
        self._seed_episodes(self._pending_seed)
        self._pending_seed = None
        _gl_context_created = _gl_context_created or offscreen
        self._xml = self._own_xml = self._rs.model.get_xml()

    def _seed_episodes(self, seed: int | None) -> None:
        # Reseed robosuite's generator in place: its placement sampler holds a reference to it.
        self._rs.rng.bit_generator.state = np.random.default_rng(seed).bit_generator.state

    # ------------------------------------------------------------------ gym API
    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        if seed is not None and self._rs is None:
            self._pending_seed = seed
        self._ensure_built()
        state = (options or {}).get("state")
        if state is None and (options or {}).get("states") is not None:
            state = options["states"][self.vector_index]
        if state is not None:
            obs = self.restore_state(state)
        else:
            if self._xml != self._own_xml:  # a restored state brought another model: back to this env's own
                self._rs.reset_from_xml_string(self._own_xml)
                self._xml = self._own_xml
            if seed is not None:
                self._seed_episodes(seed)
            self._rs.reset()
            state_lib.refresh_controllers(self._rs)
            apply_render_settings(self._rs, self.config.render_settings)
            self._elapsed = 0
            obs = self._observation(self._rs.observe())
        return obs, {"success": self.check_success()}

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        if self._rs is None:
            raise RuntimeError("call reset() before step()")
        action = np.clip(np.asarray(action, dtype=np.float64).reshape(ACTION_DIM), -1.0, 1.0)
        raw, reward, _, _ = self._rs.step(action)
        self._elapsed += 1
        success = self.check_success()
        terminated = success and self.config.terminate_on_success
        truncated = self._elapsed >= self.max_episode_steps and not terminated
        return self._observation(raw), float(reward), terminated, truncated, {"success": success}

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array" or self._rs is None:
            return None
        h, w = self.config.camera_size
        cam = CAMERAS[self.config.camera_names[0]] if self.config.camera_names else "agentview"
        return np.ascontiguousarray(self._rs.sim.render(camera_name=cam, width=w, height=h)[::-1])

    def close(self) -> None:
        if self._rs is not None:
            self._rs.close()
            self._rs = None

    # ------------------------------------------------------------------ task helpers
    def check_success(self) -> bool:
        """The task's success check on the current sim state."""
        self._ensure_built()
        return bool(self._rs._check_success())

    @property
    def elapsed_steps(self) -> int:
        """Env steps since the last reset (restored from a state's ``step`` field)."""
        return self._elapsed

    def get_state(self) -> dict[str, Any]:
        """Exact state: ``states`` (float64 flat sim state), ``model_file`` (XML str), ``gripper_action``
        (float64), ``initial_joint`` (float64), ``warmstart`` (float64 solver warm start) and ``step``
        (int, elapsed env steps): numpy arrays, a str and an int, so it pickles and stores in HDF5."""
        self._ensure_built()
        state = state_lib.capture_state(self._rs, self._xml)
        state["step"] = self._elapsed
        return state

    def restore_state(self, state: dict[str, Any]) -> dict:
        """Restore a :meth:`get_state` dict bitwise; returns the observation."""
        self._ensure_built()
        state_lib.restore_state(self._rs, state, self._xml)
        xml = state["model_file"]
        self._xml = xml.decode() if isinstance(xml, bytes) else xml
        apply_render_settings(self._rs, self.config.render_settings)
        self._elapsed = int(state.get("step", 0))
        return self._observation(self._rs.observe())

    def _observation(self, raw: dict[str, Any]) -> dict[str, Any]:
        obs: dict[str, Any] = {}
        for cam in self.config.camera_names:
            obs[cam] = np.ascontiguousarray(raw[f"{CAMERAS[cam]}_image"][::-1])
        for key, (rs_key, _) in {**ROBOT_OBS, **self.spec_task.object_obs}.items():
            obs[key] = np.asarray(raw[rs_key], dtype=np.float32)
        obs["task"] = self.task_description
        return obs


class FrankaLift(FrankaEnv):
    """Lift the cube off the table (robosuite ``Lift``)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("lift", **kwargs)


class FrankaStack(FrankaEnv):
    """Stack the red cube on the green cube (robosuite ``Stack``)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("stack", **kwargs)


def make_env(task: str, **kwargs: Any) -> FrankaEnv:
    """Build the FrankaLift or FrankaStack env for ``task`` ("lift" or "stack") with ``FrankaEnv`` kwargs."""
    return {"lift": FrankaLift, "stack": FrankaStack}[get_task(task).name](**kwargs)


def register_envs() -> None:
    """Register the gymnasium ids ``policyserve/FrankaLift-v0`` and ``policyserve/FrankaStack-v0``."""
    for task, env_id in GYM_IDS.items():
        if env_id not in gym.registry:
            cls = {"lift": "FrankaLift", "stack": "FrankaStack"}[task]
            gym.register(id=env_id, entry_point=f"policyserve.sim.envs:{cls}")
