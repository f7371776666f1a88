"""FrankaLift / FrankaStack gymnasium API: spaces, observation layout, success and episode ends."""

from __future__ import annotations

import numpy as np
import pytest

gym = pytest.importorskip("gymnasium")
pytest.importorskip("robosuite")

from policyserve.sim import GYM_IDS, make_env  # noqa: E402
from policyserve.sim.envs import CAMERAS  # noqa: E402
from policyserve.sim.scripted import ScriptedExpert  # noqa: E402

pytestmark = pytest.mark.sim

COMMON = {"eef_pos": 3, "eef_quat": 4, "gripper_pos": 2, "joint_pos": 7, "joint_vel": 7}
OBJECTS = {
    "lift": {"cube_pos": 3, "cube_quat": 4},
    "stack": {"cube_a_pos": 3, "cube_a_quat": 4, "cube_b_pos": 3, "cube_b_quat": 4},
}


@pytest.mark.parametrize("task", ["lift", "stack"])
def test_gym_make_spaces_and_observation(task: str) -> None:
    env = gym.make(GYM_IDS[task], camera_size=(32, 48))
    try:
        obs, info = env.reset(seed=0)
        assert info == {"success": False}
        assert env.action_space.shape == (7,) and env.action_space.dtype == np.float32
        assert np.all(env.action_space.low == -1) and np.all(env.action_space.high == 1)
        expected = {"table_cam", "wrist_cam", "task", *COMMON, *OBJECTS[task]}
        assert set(obs) == expected == set(env.observation_space.spaces)
        for key, size in {**COMMON, **OBJECTS[task]}.items():
            assert obs[key].shape == (size,) and obs[key].dtype == np.float32, key
        for cam in ("table_cam", "wrist_cam"):
            assert obs[cam].shape == (32, 48, 3) and obs[cam].dtype == np.uint8
        assert not np.array_equal(obs["table_cam"], obs["wrist_cam"])
        assert obs["task"] == env.unwrapped.task_description and "cube" in obs["task"]
        assert env.observation_space.contains(obs)
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert env.observation_space.contains(obs)
        assert isinstance(info["success"], bool) and not (terminated or truncated)
    finally:
        env.close()


def test_images_are_upright() -> None:
    env = make_env("lift", camera_names=("table_cam",), camera_size=(32, 32))
    try:
        obs, _ = env.reset(seed=1)
        raw = env.robosuite_env.sim.render(camera_name=CAMERAS["table_cam"], width=32, height=32)
        assert np.array_equal(obs["table_cam"], raw[::-1])  # robosuite renders bottom-up
        assert not np.array_equal(obs["table_cam"], raw)
        assert "wrist_cam" not in obs
    finally:
        env.close()


def test_success_terminates_and_time_limit_truncates() -> None:
    env = make_env("lift", camera_names=(), max_episode_steps=200)
    expert = ScriptedExpert("lift")
    try:
        obs, info = env.reset(seed=0)
        assert not info["success"] and not env.check_success()
        for _ in range(200):
            obs, _, terminated, truncated, info = env.step(expert.act(obs))
            if terminated or truncated:
                break
        assert terminated and not truncated and info["success"]
        assert obs["cube_pos"][2] > 0.84  # lifted off the 0.8 m table

        short = make_env("lift", camera_names=(), max_episode_steps=3, terminate_on_success=False)
        short.reset(seed=0)
        ends = [short.step(np.zeros(7, np.float32))[2:4] for _ in range(3)]
        assert ends == [(False, False), (False, False), (False, True)]
        short.close()
    finally:
        env.close()


def test_unknown_task_and_camera_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown task"):
        make_env("push")
    with pytest.raises(ValueError, match="unknown cameras"):
        make_env("lift", camera_names=("side_cam",))
