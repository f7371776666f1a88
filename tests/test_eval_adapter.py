"""EnvPolicyAdapter: env observations -> nested policy batch, history frames, dtype/torch input, actions back."""

from __future__ import annotations

import json

import numpy as np
import pytest

from policyserve.errors import ConfigError, ValidationError
from policyserve.client.adapter import EnvPolicyAdapter, HistoryBuffer, KeyMap
from policyserve.policies import validation
from policyserve.registry import get_embodiment_spec
from policyserve.types import ModalityConfig

H = W = 8


def franka():
    spec = get_embodiment_spec("franka_panda")
    return spec.modality_configs, spec.dims


def env_obs(t: float = 0.0, task: str = "lift the cube") -> dict:
    return {
        "table_cam": np.full((H, W, 3), int(t) % 256, np.uint8),
        "wrist_cam": np.full((H, W, 3), 100 + int(t) % 100, np.uint8),
        "eef_pos": np.array([t, 1.0, 2.0], np.float64),
        "eef_quat": np.array([0, 0, 0, 1], np.float32),
        "gripper_pos": np.array([0.01, -0.01], np.float32),
        "joint_pos": np.zeros(7, np.float32),
        "task": task,
    }


def test_default_mapping_builds_a_valid_nested_batch():
    configs, dims = franka()
    adapter = EnvPolicyAdapter(configs, n_envs=2)
    adapter.push(env_obs(3), 0)
    adapter.push(env_obs(5, "stack it"), 1)
    obs = adapter.build()
    assert validation.check_observation(obs, configs, dims) == 2
    assert obs["video"]["ego_view"].shape == (2, 1, H, W, 3)
    assert obs["video"]["ego_view"][1, 0, 0, 0, 0] == 5  # table_cam -> ego_view
    assert obs["video"]["wrist_view"][0, 0, 0, 0, 0] == 103  # wrist_cam -> wrist_view
    assert obs["state"]["eef_pos"].dtype == np.float32 and obs["state"]["eef_pos"][1, 0, 0] == 5.0
    assert obs["language"]["annotation.human.action.task_description"] == [["lift the cube"], ["stack it"]]


def test_history_buffer_sends_real_past_frames_and_forgets_on_reset():
    configs, _ = franka()
    configs = dict(configs)
    configs["state"] = ModalityConfig(delta_indices=[-2, -1, 0], modality_keys=["eef_pos"])
    configs["video"] = ModalityConfig(delta_indices=[-1, 0], modality_keys=["ego_view"])
    adapter = EnvPolicyAdapter(configs, n_envs=1)
    adapter.push(env_obs(0), 0)
    first = adapter.build()
    assert first["state"]["eef_pos"][0, :, 0].tolist() == [0, 0, 0]  # episode start: earliest frame repeated
    for t in (1, 2, 3):
        adapter.push(env_obs(t), 0)
    obs = adapter.build()
    assert obs["state"]["eef_pos"].shape == (1, 3, 3)
    assert obs["state"]["eef_pos"][0, :, 0].tolist() == [1, 2, 3]
    assert obs["video"]["ego_view"][0, :, 0, 0, 0].tolist() == [2, 3]
    adapter.reset([0])
    adapter.push(env_obs(10), 0)
    assert adapter.build()["state"]["eef_pos"][0, :, 0].tolist() == [10, 10, 10]


def test_history_rejects_future_offsets():
    with pytest.raises(ConfigError, match="delta_indices must be <= 0"):
        HistoryBuffer(1, [0, 1])


def test_batched_torch_input_matches_numpy_and_casts_dtypes():
    torch = pytest.importorskip("torch")
    configs, dims = franka()
    per_env = [env_obs(1), env_obs(2)]
    batched_np = {k: np.stack([o[k] for o in per_env]) for k in per_env[0] if k != "task"}
    batched_np["task"] = [o["task"] for o in per_env]
    batched_torch = {k: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v) for k, v in batched_np.items()}
    batched_torch["table_cam"] = batched_torch["table_cam"].float() / 255.0  # float images in [0, 1]
    from_np = EnvPolicyAdapter(configs, 2)(batched_np)
    from_torch = EnvPolicyAdapter(configs, 2)(batched_torch)
    assert validation.check_observation(from_torch, configs, dims) == 2
    for modality in ("video", "state"):
        for key, value in from_np[modality].items():
            assert from_torch[modality][key].dtype == value.dtype
            np.testing.assert_allclose(from_torch[modality][key], value, atol=1)
    assert from_torch["language"] == from_np["language"]


def test_batched_input_with_wrong_batch_size_names_the_key():
    configs, _ = franka()
    obs = {k: np.stack([v] * 3) if isinstance(v, np.ndarray) else v for k, v in env_obs().items()}
    with pytest.raises(ValidationError, match="ego_view.*leading axis 2"):
        EnvPolicyAdapter(configs, 2)(obs)


def test_missing_env_key_names_policy_and_env_key():
    configs, _ = franka()
    obs = env_obs()
    del obs["wrist_cam"]
    with pytest.raises(ValidationError, match=r"video\['wrist_view'\].*'wrist_cam'"):
        EnvPolicyAdapter(configs, 1).push(obs, 0)


def test_custom_key_map_from_flags_and_file(tmp_path):
    configs, _ = franka()
    obs = env_obs(7)
    obs["front"] = obs.pop("table_cam")
    obs["pos"] = obs.pop("eef_pos")
    key_map = KeyMap.from_pairs(["video.ego_view=front", "state.eef_pos=pos"])
    adapter = EnvPolicyAdapter(configs, 1, key_map)
    adapter.push(obs, 0)
    assert adapter.build()["state"]["eef_pos"][0, 0, 0] == 7
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"video": {"ego_view": "front"}, "state": {"eef_pos": "pos"},
                                "instruction": "do it"}))
    adapter = EnvPolicyAdapter(configs, 1, KeyMap.from_file(path))
    adapter.push(obs, 0)
    assert adapter.build()["language"]["annotation.human.action.task_description"] == [["do it"]]
    with pytest.raises(ConfigError, match="expected video.POLICY=ENV"):
        KeyMap.from_pairs(["ego_view:front"])
    path.write_text(json.dumps({"cameras": {}}))
    with pytest.raises(ConfigError, match="unknown entries"):
        KeyMap.from_file(path)


def test_actions_map_back_in_config_order_with_dimension_checks():
    configs, _ = franka()
    adapter = EnvPolicyAdapter(configs, 2)
    arm = np.arange(2 * 16 * 6, dtype=np.float32).reshape(2, 16, 6)
    gripper = -np.ones((2, 16, 1), np.float32)
    chunk = adapter.to_env_actions({"gripper": gripper, "arm": arm}, env_action_dim=7)  # dict order ignored
    assert chunk.shape == (2, 16, 7) and chunk.dtype == np.float32
    np.testing.assert_array_equal(chunk[..., :6], arm)
    np.testing.assert_array_equal(chunk[..., 6], -1)
    flat = adapter.to_env_actions({"action.arm": arm, "action.gripper": gripper}, 7)  # sim-wrapper keys
    np.testing.assert_array_equal(flat, chunk)
    with pytest.raises(ValidationError, match=r"action\['gripper'\].*missing"):
        adapter.to_env_actions({"arm": arm}, 7)
    with pytest.raises(ValidationError, match=r"arm\(6\) \+ gripper\(2\) = 8"):
        adapter.to_env_actions({"arm": arm, "gripper": np.zeros((2, 16, 2), np.float32)}, 7)
    with pytest.raises(ValidationError, match=r"B=2"):
        adapter.to_env_actions({"arm": arm[:1], "gripper": gripper[:1]}, 7)
