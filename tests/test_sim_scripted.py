"""Scripted expert success rates and the ScriptedPolicy (BasePolicy) interface."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("robosuite")

from policyserve.policies.base import BasePolicy  # noqa: E402
from policyserve.sim import make_env  # noqa: E402
from policyserve.sim.scripted import STATE_KEYS, ScriptedExpert, make_scripted_policy  # noqa: E402

pytestmark = pytest.mark.sim


def _successes(task: str, seeds: range) -> int:
    env = make_env(task, camera_names=())
    expert = ScriptedExpert(task)
    wins = 0
    try:
        for seed in seeds:
            obs, info = env.reset(seed=seed)
            expert.reset()
            done = False
            while not done:
                action = expert.act(obs)
                assert action.shape == (7,) and action.dtype == np.float32 and np.all(np.abs(action) <= 1)
                obs, _, terminated, truncated, info = env.step(action)
                done = terminated or truncated
            wins += info["success"]
    finally:
        env.close()
    return wins


@pytest.mark.parametrize(("task", "needed"), [("lift", 4), ("stack", 3)])
def test_expert_solves_task(task: str, needed: int) -> None:
    assert _successes(task, range(100, 105)) >= needed


def _nested(obs_list: list[dict], keys: list[str]) -> dict:
    return {
        "video": {},
        "state": {k: np.stack([o[k] for o in obs_list])[:, None, :].astype(np.float32) for k in keys},
        "language": {"annotation.human.action.task_description": [[o["task"]] for o in obs_list]},
    }


def test_scripted_policy_drives_env_in_chunks() -> None:
    policy = make_scripted_policy("lift")
    assert isinstance(policy, BasePolicy)
    config = policy.get_modality_config()
    assert config["state"].modality_keys == ["eef_pos", "eef_quat", "gripper_pos", *STATE_KEYS["lift"]]
    assert config["video"].modality_keys == [] and config["action"].modality_keys == ["arm", "gripper"]

    env = make_env("lift", camera_names=())
    try:
        obs, info = env.reset(seed=7)
        policy.reset()
        for _ in range(30):
            action, _ = policy.get_action(_nested([obs], config["state"].modality_keys))
            assert action["arm"].shape == (1, 16, 6) and action["gripper"].shape == (1, 16, 1)
            assert action["arm"].dtype == np.float32
            for t in range(8):  # execute half of each chunk, like a typical client
                step = np.concatenate([action["arm"][0, t], action["gripper"][0, t]])
                obs, _, terminated, truncated, info = env.step(step)
                if terminated or truncated:
                    break
            if terminated or truncated:
                break
        assert info["success"]
    finally:
        env.close()


def test_scripted_policy_keeps_per_env_phase() -> None:
    policy = make_scripted_policy("stack")
    keys = policy.get_modality_config()["state"].modality_keys
    near = {"eef_pos": np.array([0.0, 0.0, 0.9]), "eef_quat": np.zeros(4), "gripper_pos": np.zeros(2),
            "cube_a_pos": np.array([0.0, 0.0, 0.9]), "cube_b_pos": np.array([0.1, 0.1, 0.82]), "task": "t"}
    far = {**near, "eef_pos": np.array([0.2, 0.2, 1.0])}
    _, info = policy.get_action(_nested([near, far], keys))
    assert info["phase"][0] != "approach" and info["phase"][1] == "approach"
    policy.reset({"env_ids": [0]})
    _, info = policy.get_action(_nested([far, far], keys))
    assert info["phase"] == ["approach", "approach"]
