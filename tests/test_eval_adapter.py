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
    key_map = KeyMap.from_pairs(["video.front=ego_view", "state.pos=eef_pos"])
    adapter = EnvPolicyAdapter(configs, 1, key_map)
    adapter.push(obs, 0)
    assert adapter.build()["state"]["eef_pos"][0, 0, 0] == 7
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"video": {"front": "ego_view"}, "state": {"pos": "eef_pos"},
                                "instruction": "do it"}))
    adapter = EnvPolicyAdapter(configs, 1, KeyMap.from_file(path))
    adapter.push(obs, 0)
    assert adapter.build()["language"]["annotation.human.action.task_description"] == [["do it"]]
    with pytest.raises(ConfigError, match="expected video.ENV=POLICY"):
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


def two_arm_configs():
    return {
        "video": ModalityConfig([0], ["ego_view"]),
        "state": ModalityConfig([0], ["left_arm", "right_arm"]),
        "action": ModalityConfig(list(range(4)), ["arms"]),
        "language": ModalityConfig([0], ["task_description"]),
    }


def test_key_map_slices_an_env_vector_into_policy_state_keys():
    joint_pos = np.arange(2 * 14, dtype=np.float32).reshape(2, 14)
    key_map = KeyMap.from_pairs(["video.cam=ego_view", "state.joint_pos[0:7]=left_arm",
                                 "state.joint_pos[7:14]=right_arm", "instruction=pick the cube"])
    adapter = EnvPolicyAdapter(two_arm_configs(), 2, key_map)
    obs = adapter({"cam": np.zeros((2, H, W, 3), np.uint8), "joint_pos": joint_pos})
    np.testing.assert_array_equal(obs["state"]["left_arm"][:, 0], joint_pos[:, :7])
    np.testing.assert_array_equal(obs["state"]["right_arm"][:, 0], joint_pos[:, 7:])
    assert obs["language"]["task_description"] == [["pick the cube"]] * 2
    assert KeyMap(state={"q[3]": "left_arm"}).source("state", "left_arm").take(np.arange(5)).tolist() == [3]
    with pytest.raises(ConfigError, match=r"expected KEY, KEY\[START:STOP\]"):
        KeyMap(state={"q[a:b]": "left_arm"}).resolve(two_arm_configs())
    with pytest.raises(ConfigError, match=r"video.cam\[0:2\] -> 'ego_view': only state env keys can be sliced"):
        KeyMap(video={"cam[0:2]": "ego_view"}).resolve(two_arm_configs())


def test_unused_key_map_entries_are_all_listed():
    # written policy -> env (the old direction): every entry feeds no policy key
    key_map = KeyMap(video={"ego_view": "cam"}, state={"left_arm": "joint_pos", "right_arm": "joint_pos"})
    with pytest.raises(ConfigError) as info:
        EnvPolicyAdapter(two_arm_configs(), 1, key_map)
    text = str(info.value)
    assert "unused or invalid entries" in text
    for entry in ("video.ego_view -> 'cam'", "state.left_arm -> 'joint_pos'", "state.right_arm -> 'joint_pos'"):
        assert entry in text
    with pytest.raises(ConfigError, match=r"fed by 2 env keys \['a', 'b'\]"):
        KeyMap(state={"a": "left_arm", "b": "left_arm"}).resolve(two_arm_configs())


def test_missing_env_keys_are_all_listed_with_the_instruction_hint():
    adapter = EnvPolicyAdapter(two_arm_configs(), 1, KeyMap(video={"cam": "ego_view"}))
    with pytest.raises(ValidationError) as info:
        adapter.push({"cam": np.zeros((H, W, 3), np.uint8)}, 0)
    text = str(info.value)
    assert "all 3 missing" in text and "'left_arm'" in text and "'right_arm'" in text and "'task'" in text
    assert "KeyMap(instruction=" in text


def test_language_list_of_the_wrong_length_is_a_clear_error():
    configs, _ = franka()
    obs = {k: np.stack([v] * 2) if isinstance(v, np.ndarray) else v for k, v in env_obs().items()}
    obs["task"] = ["lift the cube"] * 3
    with pytest.raises(ValidationError, match=r"language\['annotation.human.action.task_description'\].*one str "
                                              r"per env \(2\).*list of 3"):
        EnvPolicyAdapter(configs, 2)(obs)
    obs["task"] = "lift the cube"  # one text for all envs
    assert EnvPolicyAdapter(configs, 2)(obs)["language"]["annotation.human.action.task_description"] == \
        [["lift the cube"]] * 2


def test_key_map_template_lists_env_keys_and_placeholders():
    from policyserve.client.keymap import key_map_template

    text = key_map_template({"cam": np.zeros((2, H, W, 3), np.uint8), "joint_pos": np.zeros((2, 14))},
                            two_arm_configs())
    body = json.loads(text.split("\n", 1)[1].split("\n# env")[0])
    assert body == {"video": {"?1": "ego_view"}, "state": {"?2": "left_arm", "?3": "right_arm"},
                    "instruction": "describe the task here"}
    assert "joint_pos: shape (2, 14)" in text and "cam: shape (2, 8, 8, 3)" in text
