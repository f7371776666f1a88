"""make_vec_env: batched observations, stepping, autoreset and per-sub-env state restore."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("robosuite")

from policyserve.sim import make_vec_env, restore_states  # noqa: E402

pytestmark = pytest.mark.sim


@pytest.mark.timeout(240)
@pytest.mark.parametrize("async_", [True, False])
def test_two_envs_step_reset_and_restore(async_: bool) -> None:
    vec = make_vec_env("lift", 2, async_=async_, seed=0, camera_size=(32, 32), max_episode_steps=4)
    try:
        obs, info = vec.reset(seed=0)
        assert obs["table_cam"].shape == (2, 32, 32, 3) and obs["eef_pos"].shape == (2, 3)
        assert list(obs["task"]) == ["lift the cube"] * 2
        assert not np.array_equal(obs["cube_pos"][0], obs["cube_pos"][1])
        for _ in range(4):
            obs, _, terminated, truncated, info = vec.step(np.zeros((2, 7), np.float32))
        assert truncated.all() and not terminated.any() and info["success"].shape == (2,)
        obs, *_ = vec.step(np.zeros((2, 7), np.float32))  # NEXT_STEP autoreset
        assert vec.get_attr("elapsed_steps") == (0, 0)

        obs, *_ = vec.step(np.full((2, 7), 0.5, np.float32))
        states = vec.call("get_state")
        restored, _ = restore_states(vec, {1: states[0]})
        after = vec.call("get_state")
        assert np.array_equal(after[1]["states"], states[0]["states"])
        assert np.array_equal(after[0]["states"], states[0]["states"])  # sub-env 0 untouched
    finally:
        vec.close()


@pytest.mark.timeout(240)
def test_env_batch_steps_and_restores_chosen_envs_only() -> None:
    from policyserve.sim.vector import make_env_batch

    batch = make_env_batch("lift", 2, camera_names=("table_cam",), camera_size=(32, 32), max_episode_steps=50)
    try:
        batch.reset(0, seed=0)
        batch.reset(1, seed=1)
        start = batch.envs[0].get_state()
        for _ in range(3):
            batch.step(0, np.full(7, 0.5, np.float32))
        assert batch.envs[0].elapsed_steps == 3 and batch.envs[1].elapsed_steps == 0  # env 1 was left alone
        obs = batch.observation(["table_cam", "eef_pos", "task", "no_such_key"])
        assert obs["table_cam"].shape == (2, 32, 32, 3) and obs["eef_pos"].shape == (2, 3)
        assert obs["task"] == ["lift the cube"] * 2 and "no_such_key" not in obs
        moved = obs["eef_pos"][0].copy()
        batch.reset(1, state=start)  # env 1 restored to env 0's start state, exactly
        restored = batch.observation(["eef_pos", "table_cam"], [1])
        batch.reset(0, state=start)
        again = batch.observation(["eef_pos", "table_cam"], [0])
        np.testing.assert_array_equal(restored["eef_pos"], again["eef_pos"])
        np.testing.assert_array_equal(restored["table_cam"], again["table_cam"])
        assert not np.array_equal(moved, again["eef_pos"][0])
    finally:
        batch.close()
