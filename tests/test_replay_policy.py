"""ReplayPolicy semantics on gr1.PickNPlace: horizon, padding, cursor, reset, episode_done, batching, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from policyserve.data.lerobot import DatasetError, LeRobotDataset
from policyserve.errors import ConfigError, ValidationError
from policyserve.policies.replay import ReplayError, ReplayPolicy, make_replay_policy
from policyserve.registry import save_modality_config_file
from policyserve.types import ModalityConfig

TASK_KEY = "annotation.human.action.task_description"


@pytest.fixture(scope="module")
def dataset(gr1_dataset_path: Path) -> LeRobotDataset:
    return LeRobotDataset(gr1_dataset_path)


@pytest.fixture(scope="module")
def raw(dataset: LeRobotDataset) -> dict[int, np.ndarray]:
    """Concatenated float32 actions per episode, (L, 44)."""
    return {i: dataset.read_columns(i, ["action"])["action"].astype(np.float32) for i in dataset.episode_indices}


def configs(dataset: LeRobotDataset, delta_indices: list[int] | None = None) -> dict[str, ModalityConfig]:
    result = dataset.infer_modality_configs(16)
    if delta_indices is not None:
        result["action"] = ModalityConfig(delta_indices=delta_indices, modality_keys=dataset.action_keys)
    return result


def chunk(action: dict[str, np.ndarray]) -> np.ndarray:
    """(B, H, 44) from the per-group action dict (groups are contiguous in order)."""
    return np.concatenate(list(action.values()), axis=2)


def observation(batch: int) -> dict:
    return {
        "video": {"ego_view_bg_crop_pad_res256_freq20": np.zeros((batch, 1, 256, 256, 3), np.uint8)},
        "state": {k: np.zeros((batch, 1, d), np.float32) for k, d in
                  {"left_arm": 7, "left_hand": 6, "left_leg": 6, "neck": 3, "right_arm": 7, "right_hand": 6,
                   "right_leg": 6, "waist": 3}.items()},
        "language": {TASK_KEY: [["pick"]] * batch},
    }


def test_chunk_length_comes_from_delta_index_span(dataset: LeRobotDataset, raw: dict) -> None:
    policy = ReplayPolicy(dataset, configs(dataset, [0, 5, 9]), 4)
    action, info = policy.get_action(None, {"batch_size": 1})
    assert chunk(action).shape == (1, 10, 44) and action["neck"].dtype == np.float32
    np.testing.assert_array_equal(chunk(action)[0], raw[0][:10])
    assert info == {"replay": True, "execution_horizon": 4, "current_step": 0, "episode_index": 0,
                    "episode_length": 416, "num_episodes": 5, "episode_done": False}


def test_cursor_advances_by_execution_horizon(dataset: LeRobotDataset, raw: dict) -> None:
    policy = ReplayPolicy(dataset, configs(dataset), 8)
    for step in (0, 8, 16):
        action, info = policy.get_action(None)
        assert info["current_step"] == step
        np.testing.assert_array_equal(chunk(action)[0], raw[0][step:step + 16])


def test_padding_and_episode_done_at_the_end(dataset: LeRobotDataset, raw: dict) -> None:
    policy = ReplayPolicy(dataset, configs(dataset), 8)
    info = policy.reset({"episode_index": 4, "step_index": 317})
    assert info == {"replay": True, "execution_horizon": 8, "current_step": 317, "episode_index": 4,
                    "episode_length": 328, "num_episodes": 5, "episode_done": False}
    action, info = policy.get_action(None)  # rows 317..327 then the last row repeated
    expected = np.concatenate([raw[4][317:], np.repeat(raw[4][-1:], 5, axis=0)])
    np.testing.assert_array_equal(chunk(action)[0], expected)
    assert info["episode_done"] is False  # cursor 325 < 328
    action, info = policy.get_action(None)
    assert info["current_step"] == 325 and info["episode_done"] is True  # cursor now 333 >= 328
    action, info = policy.get_action(None)  # wholly past the end: the final pose held
    np.testing.assert_array_equal(chunk(action)[0], np.repeat(raw[4][-1:], 16, axis=0))
    assert info["current_step"] == 333 and info["episode_done"] is True


def test_reset_without_options_restarts_episode(dataset: LeRobotDataset) -> None:
    policy = ReplayPolicy(dataset, configs(dataset), 8)
    policy.reset({"episode_index": 2, "step_index": 100})
    policy.get_action(None)
    assert policy.reset() == {"replay": True, "execution_horizon": 8, "current_step": 0, "episode_index": 2,
                              "episode_length": 470, "num_episodes": 5, "episode_done": False}


def test_batch_tiling_from_observation_and_options(dataset: LeRobotDataset, raw: dict) -> None:
    policy = ReplayPolicy(dataset, configs(dataset), 8)
    action, _ = policy.get_action(observation(3))
    assert chunk(action).shape == (3, 16, 44)
    for b in range(3):
        np.testing.assert_array_equal(chunk(action)[b], raw[0][:16])
    action, _ = policy.get_action(None, {"batch_size": 4})
    assert chunk(action).shape == (4, 16, 44)
    np.testing.assert_array_equal(chunk(action)[3], raw[0][8:24])


def test_per_env_episodes(dataset: LeRobotDataset, raw: dict) -> None:
    policy = ReplayPolicy(dataset, configs(dataset), 8)
    info = policy.reset({"episode_index": [3, 0], "step_index": [410, 5]})
    assert info["episode_index"] == [3, 0] and info["episode_length"] == [412, 416]
    action, info = policy.get_action(observation(2))
    np.testing.assert_array_equal(chunk(action)[0], np.concatenate([raw[3][410:], np.repeat(raw[3][-1:], 14, 0)]))
    np.testing.assert_array_equal(chunk(action)[1], raw[0][5:21])
    assert info["current_step"] == [410, 5] and info["episode_done"] == [True, False]
    with pytest.raises(ReplayError, match="batch size 3 does not match the 2 per-env episodes"):
        policy.get_action(observation(3))
    info = policy.reset({"episode_index": 1})  # back to one shared episode
    assert info["episode_index"] == 1 and chunk(policy.get_action(observation(3))[0]).shape == (3, 16, 44)


def test_reset_of_some_envs_keeps_the_cursors_of_the_others(dataset: LeRobotDataset, raw: dict) -> None:
    policy = ReplayPolicy(dataset, configs(dataset), 8)
    info = policy.reset({"env_ids": [0, 1, 2], "episode_index": [3, 0, 1], "step_index": [10, 20, 30]})
    assert info["episode_index"] == [3, 0, 1] and info["current_step"] == [10, 20, 30]
    policy.get_action(observation(3))  # every cursor advances by 8
    info = policy.reset({"env_ids": [1], "episode_index": [2], "step_index": [5]})
    assert info["episode_index"] == [3, 2, 1] and info["current_step"] == [18, 5, 38]
    assert info["replay"] is True and info["execution_horizon"] == 8
    action, info = policy.get_action(observation(3))
    np.testing.assert_array_equal(chunk(action)[0], raw[3][18:34])
    np.testing.assert_array_equal(chunk(action)[1], raw[2][5:21])
    np.testing.assert_array_equal(chunk(action)[2], raw[1][38:54])
    info = policy.reset({"env_ids": [2, 0], "step_index": 0})  # scalar: both envs; their episodes are kept
    assert info["episode_index"] == [3, 2, 1] and info["current_step"] == [0, 13, 0]
    info = policy.reset({"env_ids": [4]})  # a new env index grows the batch; env 3 copies the last env
    assert info["episode_index"] == [3, 2, 1, 1, 1] and info["current_step"] == [0, 13, 0, 0, 0]
    with pytest.raises(ReplayError, match=r"options\['episode_index'\] has 2 entries for 1 env_ids \[0\]"):
        policy.reset({"env_ids": [0], "episode_index": [1, 2]})
    with pytest.raises(ReplayError, match=r"distinct env indices >= 0, got \[1, 1\]"):
        policy.reset({"env_ids": [1, 1]})
    with pytest.raises(ReplayError, match=r"step_index 999 is out of range for episode 3"):
        policy.reset({"env_ids": [1, 0], "step_index": [0, 999]})
    assert policy.get_action(observation(5))[1]["current_step"] == [0, 13, 0, 0, 0]  # failed resets changed nothing


def test_bad_reset_keeps_position(dataset: LeRobotDataset) -> None:
    policy = ReplayPolicy(dataset, configs(dataset), 8)
    policy.reset({"episode_index": 1, "step_index": 40})
    with pytest.raises(DatasetError, match=r"episode_index 5 is not in dataset .* indices 0..4"):
        policy.reset({"episode_index": 5})
    with pytest.raises(ReplayError, match=r"step_index 470 is out of range for episode 1 \(length 470\); valid steps"):
        policy.reset({"episode_index": 1, "step_index": 470})
    with pytest.raises(ReplayError, match="step_index -1 is out of range"):
        policy.reset({"step_index": -1})
    with pytest.raises(ReplayError, match=r"options\['episode_index'\] must be an integer, got str"):
        policy.reset({"episode_index": "2"})
    with pytest.raises(ReplayError, match=r"step_index'\] has 1 entries but there are 2 episodes"):
        policy.reset({"episode_index": [0, 1], "step_index": [3]})
    with pytest.raises(ReplayError, match="empty list"):
        policy.reset({"episode_index": []})
    assert policy.get_action(None)[1]["current_step"] == 40 and policy.get_action(None)[1]["episode_index"] == 1


def test_construction_errors(dataset: LeRobotDataset) -> None:
    with pytest.raises(ConfigError, match=r"execution_horizon \(17\) must not exceed the action horizon \(16"):
        ReplayPolicy(dataset, configs(dataset), 17)
    with pytest.raises(ConfigError, match="execution_horizon must be a positive integer"):
        ReplayPolicy(dataset, configs(dataset), 0)
    partial = configs(dataset)
    del partial["language"]
    with pytest.raises(ConfigError, match="missing modality 'language'"):
        ReplayPolicy(dataset, partial, 8)
    wrong = configs(dataset)
    wrong["action"] = ModalityConfig(delta_indices=[0], modality_keys=["left_arm", "gripper"])
    with pytest.raises(ConfigError, match=r"action key\(s\) \['gripper'\] of the modality config are not in dataset"):
        ReplayPolicy(dataset, wrong, 1)
    wrong["action"] = ModalityConfig(delta_indices=[0], modality_keys=[])
    with pytest.raises(ConfigError, match="lists no keys"):
        ReplayPolicy(dataset, wrong, 1)


def test_strict_validation_of_observations(dataset: LeRobotDataset) -> None:
    policy = ReplayPolicy(dataset, configs(dataset), 8)
    obs = observation(2)
    obs["state"]["neck"] = np.zeros((2, 1, 3), np.float64)
    with pytest.raises(ValidationError, match=r"state\['neck'\]: expected dtype float32"):
        policy.get_action(obs)
    loose = ReplayPolicy(dataset, configs(dataset), 8, strict=False)
    assert chunk(loose.get_action(obs)[0]).shape == (2, 16, 44)


def test_make_replay_policy_config_sources(gr1_dataset_path: Path, dataset: LeRobotDataset, tmp_path: Path) -> None:
    inferred = make_replay_policy(gr1_dataset_path, 8, action_horizon=12)
    assert inferred.action_horizon == 12 and inferred.get_modality_config()["language"].modality_keys == [TASK_KEY]
    assert make_replay_policy(gr1_dataset_path, 8, embodiment_tag="NEW_EMBODIMENT").action_horizon == 16
    path = tmp_path / "gr1.json"
    save_modality_config_file(path, configs(dataset, [0, 1, 2, 3]))
    from_file = make_replay_policy(gr1_dataset_path, 2, modality_config_path=path, embodiment_tag="libero_panda")
    assert isinstance(from_file.get_modality_config()["action"], ModalityConfig) and from_file.action_horizon == 4
    with pytest.raises(ConfigError, match=r"action key\(s\) \['x', 'y', 'z'.*not in dataset"):
        make_replay_policy(gr1_dataset_path, 8, embodiment_tag="libero_panda")
    with pytest.raises(ConfigError, match="no modality config registered for embodiment 'robot_x'"):
        make_replay_policy(gr1_dataset_path, 8, embodiment_tag="robot_x")
    path.write_text(json.dumps({"video": {}}))
    with pytest.raises(ConfigError, match="gr1.json: modality 'video'"):
        make_replay_policy(gr1_dataset_path, 8, modality_config_path=path)
    with pytest.raises(ConfigError, match="modality config file not found"):
        make_replay_policy(gr1_dataset_path, 8, modality_config_path=tmp_path / "none.json")
