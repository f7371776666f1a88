"""Strict validation: every rule gives a ValidationError naming modality, key, expected and actual."""

from __future__ import annotations

import numpy as np
import pytest

from policyserve import ConstantPolicy, SimPolicyWrapper, ValidationError
from policyserve.policies.validation import check_action, check_observation
from policyserve.registry import get_embodiment_spec
from policyserve.types import ModalityConfig

from helpers import LANG_KEY, franka_observation

SPEC = get_embodiment_spec("franka_panda")
CONFIGS, DIMS = SPEC.modality_configs, SPEC.dims


def _error(obs, configs=CONFIGS, dims=DIMS) -> str:
    with pytest.raises(ValidationError) as info:
        check_observation(obs, configs, dims)
    assert not isinstance(info.value, KeyError)
    return str(info.value)


def test_valid_observation_returns_batch_size():
    assert check_observation(franka_observation(batch=4), CONFIGS, DIMS) == 4


@pytest.mark.parametrize("modality", ["video", "state", "language"])
def test_missing_modality(modality):
    obs = franka_observation()
    del obs[modality]
    assert f"key {modality!r} in the observation" in _error(obs)


def test_modality_not_a_dict():
    obs = franka_observation()
    obs["state"] = [1, 2]
    assert "state: expected a dict of key -> array, got list" in _error(obs)


def test_missing_key_is_not_a_bare_keyerror():
    obs = franka_observation()
    del obs["state"]["gripper_pos"]
    msg = _error(obs)
    assert "state['gripper_pos'] missing" in msg and "eef_pos" in msg


def test_video_dtype():
    obs = franka_observation()
    obs["video"]["ego_view"] = obs["video"]["ego_view"].astype(np.float32)
    assert "video['ego_view']: expected dtype uint8, got dtype float32" in _error(obs)


def test_state_dtype_float64_rejected():
    obs = franka_observation()
    obs["state"]["eef_pos"] = obs["state"]["eef_pos"].astype(np.float64)
    assert "state['eef_pos']: expected dtype float32, got dtype float64" in _error(obs)


def test_not_an_array():
    obs = franka_observation()
    obs["state"]["eef_pos"] = [[0.0, 0.0, 0.0]]
    assert "state['eef_pos']: expected numpy array (B, T, D), got list" in _error(obs)


def test_video_ndim():
    obs = franka_observation()
    obs["video"]["ego_view"] = obs["video"]["ego_view"][:, 0]
    assert "expected 5-D array (B, T, H, W, 3), got shape (1, 32, 32, 3)" in _error(obs)


def test_temporal_horizon():
    obs = franka_observation()
    obs["state"]["eef_quat"] = np.zeros((1, 2, 4), np.float32)
    assert "state['eef_quat']: expected time horizon T=1, got T=2" in _error(obs)


def test_channels():
    obs = franka_observation()
    obs["video"]["wrist_view"] = np.zeros((1, 1, 32, 32, 4), np.uint8)
    assert "video['wrist_view']: expected 3 channels (RGB), got 4" in _error(obs)


def test_batch_size_consistency_across_modalities():
    obs = franka_observation(batch=2)
    obs["state"]["eef_pos"] = np.zeros((3, 1, 3), np.float32)
    assert "state['eef_pos']: expected batch size 2 (as video['ego_view']), got batch size 3" in _error(obs)
    obs = franka_observation(batch=2)
    obs["language"][LANG_KEY] = [["a"]]
    assert "language" in _error(obs) and "batch size 1" in _error(obs)


@pytest.mark.parametrize("value, fragment", [
    ("lift the cube", "a list of B lists"),
    ([["a", "b"]], "item 0 a list of 1 str"),
    (["lift"], "item 0 a list of 1 str"),
    ([[3]], "str in item 0"),
])
def test_language_format(value, fragment):
    obs = franka_observation()
    obs["language"][LANG_KEY] = value
    msg = _error(obs)
    assert f"language[{LANG_KEY!r}]" in msg and fragment in msg


def test_declared_image_size_and_state_dim():
    from policyserve.types import ModalityDims

    dims = ModalityDims(video={"ego_view": (64, 64)}, state={"eef_pos": 3})
    assert "video['ego_view']: expected image size (H, W)=(64, 64), got (32, 32)" in _error(franka_observation(),
                                                                                           dims=dims)
    obs = franka_observation(state_dim_override={"eef_pos": 2})
    assert "state['eef_pos']: expected dimension D=3, got D=2" in _error(obs)


def test_action_checks():
    policy = ConstantPolicy(CONFIGS, DIMS)
    action, _ = policy.get_action(franka_observation(batch=2))
    assert check_action(action, CONFIGS, DIMS) == 2
    bad = dict(action, gripper=action["gripper"][:, :8])
    with pytest.raises(ValidationError, match=r"action\['gripper'\]: expected time horizon T=16, got T=8"):
        check_action(bad, CONFIGS, DIMS)
    with pytest.raises(ValidationError, match=r"action\['arm'\] missing"):
        check_action({"gripper": action["gripper"]}, CONFIGS, DIMS)
    with pytest.raises(ValidationError, match=r"action\['arm'\]: expected dimension D=6, got D=7"):
        check_action(dict(action, arm=np.zeros((2, 16, 7), np.float32)), CONFIGS, DIMS)
    with pytest.raises(ValidationError, match="expected batch size 3"):
        check_action(action, CONFIGS, DIMS, batch_size=3)


def test_action_horizon_uses_first_and_last_delta():
    assert ModalityConfig([0, 2, 4], ["a"]).span == 5 and ModalityConfig([0, 2, 4], ["a"]).horizon == 3


def test_strict_policy_rejects_mismatched_action_batch():
    class WrongBatch(ConstantPolicy):
        def _get_action(self, observation, options=None):
            action, info = super()._get_action(observation, options)
            return {k: v[:1] for k, v in action.items()}, info

    with pytest.raises(ValidationError, match="expected batch size 2"):
        WrongBatch(CONFIGS, DIMS).get_action(franka_observation(batch=2))
    assert WrongBatch(CONFIGS, DIMS, strict=False).get_action(franka_observation(batch=2))[0]["arm"].shape[0] == 1


def test_sim_wrapper_flat_to_nested_and_back():
    inner = ConstantPolicy(CONFIGS, DIMS, value=0.5)
    wrapper = SimPolicyWrapper(inner)
    nested = franka_observation(batch=2)
    flat = {f"video.{k}": v for k, v in nested["video"].items()}
    flat.update({f"state.{k}": v for k, v in nested["state"].items()})
    flat[LANG_KEY] = ("lift the cube", "lift the cube")
    action, _ = wrapper.get_action(flat)
    assert sorted(action) == ["action.arm", "action.gripper"]
    assert action["action.arm"].shape == (2, 16, 6) and np.all(action["action.arm"] == 0.5)
    del flat["state.eef_pos"]
    with pytest.raises(ValidationError, match="state.eef_pos missing"):
        wrapper.get_action(flat)
