"""Types, embodiment tags and the modality-config registry."""

from __future__ import annotations

import json

import pytest

from policyserve import (
    ActionConfig, ActionRepresentation, ConfigError, EmbodimentTag, ModalityConfig, get_modality_configs,
    load_modality_config_file, register_modality_config, registered_embodiments,
)


def test_embodiment_tags_match_n16():
    assert {t.name: t.value for t in EmbodimentTag} == {
        "ROBOCASA_PANDA_OMRON": "robocasa_panda_omron", "GR1": "gr1", "UNITREE_G1": "unitree_g1",
        "LIBERO_PANDA": "libero_panda", "OXE_GOOGLE": "oxe_google", "OXE_WIDOWX": "oxe_widowx",
        "OXE_DROID": "oxe_droid", "BEHAVIOR_R1_PRO": "behavior_r1_pro", "NEW_EMBODIMENT": "new_embodiment",
    }
    assert str(EmbodimentTag.GR1) == "EmbodimentTag.GR1"


@pytest.mark.parametrize("text", ["GR1", "gr1", "Gr1", EmbodimentTag.GR1])
def test_tag_lookup_by_name_or_value(text):
    assert EmbodimentTag.resolve(text) is EmbodimentTag.GR1
    assert EmbodimentTag.resolve("new_EMBODIMENT") is EmbodimentTag.NEW_EMBODIMENT


def test_unknown_tag_lists_choices():
    with pytest.raises(ValueError, match="unknown value 'gr2'.*NEW_EMBODIMENT"):
        EmbodimentTag.resolve("gr2")


def test_action_config_parses_enum_names_and_values():
    ac = ActionConfig(rep="RELATIVE", type="non_eef", format="xyz+rot6d")
    assert ac.rep is ActionRepresentation.RELATIVE and ac.format.name == "XYZ_ROT6D"
    with pytest.raises(ValueError, match="ActionRepresentation"):
        ActionConfig(rep="SIDEWAYS", type="EEF", format="DEFAULT")


def test_modality_config_validation():
    with pytest.raises(ValueError, match="action_configs has 1 entries but modality_keys has 2"):
        ModalityConfig([0], ["a", "b"], action_configs=[{"rep": "ABSOLUTE", "type": "EEF", "format": "DEFAULT"}])
    with pytest.raises(ValueError, match="delta_indices must be a list of ints"):
        ModalityConfig("0", ["a"])
    with pytest.raises(ValueError, match="unknown fields"):
        ModalityConfig.from_json({"delta_indices": [0], "modality_keys": ["a"], "extra": 1})
    config = ModalityConfig([0], ["a"], action_configs=[{"rep": "ABSOLUTE", "type": "EEF", "format": "DEFAULT"}])
    assert ModalityConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize("tag, video, horizon", [
    ("unitree_g1", ["ego_view"], 30), ("libero_panda", ["image", "wrist_image"], 16), ("oxe_widowx", ["image_0"], 8),
    ("oxe_google", ["image"], 8), ("oxe_droid", ["exterior_image_1_left", "wrist_image_left"], 32),
    ("BEHAVIOR_R1_PRO", ["observation.images.rgb.head_256_256", "observation.images.rgb.left_wrist_256_256",
                         "observation.images.rgb.right_wrist_256_256"], 32),
    ("franka_panda", ["ego_view", "wrist_view"], 16),
])
def test_pre_registered_configs(tag, video, horizon):
    configs = get_modality_configs(tag)
    assert configs["video"].modality_keys == video
    assert len(configs["action"].delta_indices) == horizon
    assert set(configs) == {"video", "state", "action", "language"}


def test_unregistered_tag_error_names_known_ones():
    with pytest.raises(ConfigError, match="no modality config registered for embodiment 'gr1'.*libero_panda"):
        get_modality_configs("GR1")


def test_register_and_load_from_json(tmp_path):
    data = {"video": {"delta_indices": [0], "modality_keys": ["cam"]},
            "state": {"delta_indices": [0], "modality_keys": ["q"]},
            "action": {"delta_indices": list(range(8)), "modality_keys": ["q"],
                       "action_configs": [{"rep": "RELATIVE", "type": "NON_EEF", "format": "DEFAULT"}]},
            "language": {"delta_indices": [0], "modality_keys": ["task"]},
            "dims": {"state": {"q": 6}}}
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(data))
    configs, dims = load_modality_config_file(path)
    assert isinstance(configs["action"], ModalityConfig)
    assert configs["action"].action_configs[0].rep is ActionRepresentation.RELATIVE
    assert dims.state == {"q": 6}
    register_modality_config(configs, "my_robot_for_test")
    assert "my_robot_for_test" in registered_embodiments()
    with pytest.raises(ConfigError, match="already registered"):
        register_modality_config(configs, "my_robot_for_test")


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_modality_config_file(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_modality_config_file(tmp_path / "bad.json")
    (tmp_path / "partial.json").write_text(json.dumps({"video": {"delta_indices": [0], "modality_keys": []}}))
    with pytest.raises(ConfigError, match="missing modality 'state'"):
        load_modality_config_file(tmp_path / "partial.json")


def test_span_counts_the_steps_from_first_to_last_offset():
    from policyserve.types import ModalityConfig

    assert ModalityConfig([0], ["a"]).span == 1
    assert ModalityConfig(list(range(16)), ["a"]).span == 16
    sparse = ModalityConfig([-10, -5, 0], ["a"])
    assert sparse.span == 11 and sparse.horizon == 3  # span: steps covered; horizon: frames sampled
