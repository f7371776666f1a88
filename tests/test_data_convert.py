"""HDF5 -> LeRobot converter: robomimic and IsaacLab-Mimic layouts, round trip through the reader and replay."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from policyserve.cli.main import main as cli_main
from policyserve.data.column_map import ColumnMap
from policyserve.data.hdf5_to_lerobot import ConversionError, convert_hdf5_to_lerobot
from policyserve.data.lerobot import DatasetError, LeRobotDataset
from policyserve.errors import ConfigError
from policyserve.policies.replay import make_replay_policy
from policyserve.registry import get_modality_configs

H, W = 32, 48
DEMOS = {0: 9, 1: 7, 6: 11}  # non-contiguous demo keys -> lengths


def _demo_arrays(n: int, length: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(n)
    return {
        "actions": rng.normal(size=(length, 7)),  # float64, compared bit for bit
        "eef_pos": rng.normal(size=(length, 3)).astype(np.float32),
        "eef_quat": rng.normal(size=(length, 4)).astype(np.float32),
        "gripper_pos": rng.normal(size=(length, 2)).astype(np.float32),
        "joint_pos": rng.normal(size=(length, 9)).astype(np.float32),
        "table_cam": rng.integers(0, 255, size=(length, H, W, 3), dtype=np.uint8),
        "wrist_cam": rng.integers(0, 255, size=(length, H, W, 3), dtype=np.uint8),
    }


def write_robomimic(path: Path, demos: dict[int, int] = DEMOS) -> dict[int, dict[str, np.ndarray]]:
    """A robomimic-layout file like the Franka recorder writes; returns the arrays per demo number."""
    arrays = {}
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = json.dumps({"env_name": "FrankaLift", "type": 1})
        data.attrs["task"] = "lift the cube"
        for n, length in demos.items():
            arrays[n] = a = _demo_arrays(n, length)
            demo = data.create_group(f"demo_{n}")
            demo.attrs["num_samples"] = length
            demo["actions"] = a["actions"]
            demo["states"] = np.zeros((length, 20))
            for key in ("eef_pos", "eef_quat", "gripper_pos", "joint_pos", "table_cam", "wrist_cam"):
                demo[f"obs/{key}"] = a[key]
    return arrays


def write_isaaclab_mimic(path: Path, demos: dict[int, int] = DEMOS) -> dict[int, dict[str, np.ndarray]]:
    """An IsaacLab-Mimic-layout file (state groups, initial_state, nested datagen_info obs)."""
    arrays = {}
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = json.dumps({"env_name": "Isaac-Stack-Cube-Franka-v0", "type": 2})
        data.attrs["total"] = sum(demos.values())
        for n, length in demos.items():
            arrays[n] = a = _demo_arrays(n, length)
            demo = data.create_group(f"demo_{n}")
            demo.attrs["num_samples"] = length
            demo.attrs["success"] = True
            demo["actions"] = a["actions"]
            for key in ("eef_pos", "eef_quat", "gripper_pos", "joint_pos", "table_cam", "wrist_cam"):
                demo[f"obs/{key}"] = a[key]
            demo["obs/datagen_info/eef_pose/franka"] = np.zeros((length, 4, 4))
            demo["states/articulation/robot/joint_position"] = a["joint_pos"]
            demo["states/articulation/robot/root_pose"] = np.zeros((length, 7))
            demo["states/rigid_object/cube_1/root_pose"] = np.zeros((length, 7))
            demo["initial_state/articulation/robot/joint_position"] = a["joint_pos"][:1]
            demo["initial_state/rigid_object/cube_1/root_pose"] = np.zeros((1, 7))
    return arrays


@pytest.mark.parametrize(
    ("writer", "layout", "fmt"),
    [(write_robomimic, "robomimic", "v2.1"), (write_isaaclab_mimic, "isaaclab_mimic", "v3.0")],
)
def test_round_trip_both_layouts(tmp_path: Path, writer, layout: str, fmt: str) -> None:
    arrays = writer(tmp_path / "demos.hdf5")
    summary = convert_hdf5_to_lerobot(tmp_path / "demos.hdf5", tmp_path / "out", progress=False, format=fmt)
    assert summary.layout == layout
    # demos with a gap become episodes 0..N-1 in demo order; the map keeps the demo names
    assert summary.demo_to_episode == {"demo_0": 0, "demo_1": 1, "demo_6": 2}
    assert summary.num_frames == sum(DEMOS.values())

    ds = LeRobotDataset(tmp_path / "out")
    assert ds.version == fmt and ds.episode_indices == [0, 1, 2]
    assert [ds.episode_length(i) for i in ds.episode_indices] == list(DEMOS.values())
    assert ds.tasks == {0: "lift the cube" if layout == "robomimic" else "Isaac-Stack-Cube-Franka-v0"}
    assert ds.state_keys == ["eef_pos", "eef_quat", "gripper_pos"]
    assert ds.action_keys == ["arm", "gripper"] and ds.video_keys == ["ego_view", "wrist_view"]
    demo_map = json.loads((tmp_path / "out/meta/hdf5_demo_map.json").read_text())
    assert demo_map["demo_to_episode"] == {"demo_0": 0, "demo_1": 1, "demo_6": 2} and demo_map["layout"] == layout
    assert ds.demo_map == demo_map["demo_to_episode"] and ds.episode_for_demo(6) == 2
    stats = json.loads((tmp_path / "out/meta/stats.json").read_text())
    assert set(stats["action"]) == {"mean", "std", "min", "max", "q01", "q99", "count"}
    assert len(stats["action"]["q99"]) == 7 and stats["action"]["count"] == [sum(DEMOS.values())]
    np.testing.assert_allclose(stats["action"]["mean"], np.concatenate([a["actions"] for a in arrays.values()]).mean(0))

    for n, a in arrays.items():
        e = summary.demo_to_episode[f"demo_{n}"]
        raw = ds.read_columns(e, ["action"])["action"]
        assert raw.dtype == np.float64 and np.array_equal(raw, a["actions"])  # bit-identical
        episode = ds.load_episode(e, video_keys=None, dtype=None)
        np.testing.assert_array_equal(episode.states["eef_quat"], a["eef_quat"])
        assert episode.videos["ego_view"].shape == (DEMOS[n], H, W, 3)
        assert episode.videos["wrist_view"].shape == (DEMOS[n], H, W, 3)
        assert episode.language["annotation.human.action.task_description"] == [ds.tasks[0]] * DEMOS[n]
        # lossy h264 but close to the source frames on average
        assert np.abs(episode.videos["ego_view"].astype(int) - a["table_cam"]).mean() < 60

    # the default column map matches the registry's franka_panda config, so the converted set replays under it
    policy = make_replay_policy(tmp_path / "out", 1, embodiment_tag="franka_panda")
    assert policy.get_modality_config() == get_modality_configs("franka_panda")
    policy.reset({"demo_index": 6})  # demo_6, episode 2
    served = [policy.get_action(None)[0] for _ in range(DEMOS[6])]
    arm = np.stack([s["arm"][0, 0] for s in served])
    np.testing.assert_array_equal(arm, arrays[6]["actions"][:, :6].astype(np.float32))


def test_eval_split_and_cli_flags(tmp_path: Path) -> None:
    write_robomimic(tmp_path / "demos.hdf5", {0: 5, 2: 5, 3: 5, 7: 5})
    rc = cli_main([
        "convert", "hdf5-to-lerobot", "--input", str(tmp_path / "demos.hdf5"), "--output", str(tmp_path / "out"),
        "--camera", "wrist_cam=hand", "--state", "joint_pos,eef_pos", "--action-split", "all=0:7",
        "--task", "stack", "--fps", "10", "--eval-proportion", "0.25", "--no-progress",
    ])
    assert rc == 0
    ds = LeRobotDataset(tmp_path / "out")
    assert ds.fps == 10 and ds.tasks == {0: "stack"} and ds.episode_for_demo(7) == 3
    assert ds.split("train") == [0, 1, 2] and ds.split("eval") == [3]
    assert ds.video_keys == ["hand"] and ds.state_keys == ["joint_pos", "eef_pos"] and ds.action_keys == ["all"]
    assert ds.modality.state["eef_pos"].start == 9 and ds.modality.state["eef_pos"].end == 12


def test_cli_names_the_overwrite_flag_for_a_used_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_robomimic(tmp_path / "demos.hdf5", {0: 5})
    argv = ["convert", "hdf5-to-lerobot", "--input", str(tmp_path / "demos.hdf5"), "--output", str(tmp_path / "out"),
            "--no-progress"]
    assert cli_main(argv) == 0
    capsys.readouterr()
    assert cli_main(argv) == 2  # bad input (1 before the exit-code table in cli/main.py)
    assert capsys.readouterr().err.strip() == f"error: output directory {tmp_path / 'out'} is not empty (pass --overwrite to replace it)"
    assert cli_main([*argv, "--overwrite"]) == 0


def test_column_map_file(tmp_path: Path) -> None:
    (tmp_path / "map.json").write_text(json.dumps({"cameras": {}, "state": ["joint_pos"], "actions": {"a": [0, 3]}}))
    write_robomimic(tmp_path / "demos.hdf5", {4: 6})
    cmap = ColumnMap.load(tmp_path / "map.json")
    convert_hdf5_to_lerobot(tmp_path / "demos.hdf5", tmp_path / "out", cmap, progress=False)
    ds = LeRobotDataset(tmp_path / "out")
    assert ds.episode_indices == [0] and ds.video_keys == [] and ds.action_keys == ["a"]
    assert ds.episode_for_demo(4) == 0 and ds.load_actions(0)["a"].shape == (6, 3)
    (tmp_path / "map.toml").write_text('state = ["eef_pos"]\n[actions]\narm = [0, 6]\n')
    assert ColumnMap.load(tmp_path / "map.toml").state == ["eef_pos"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"actions": {"arm": [6, 2]}}, "0 <= start < end"),
        ({"state": "eef_pos"}, "list of HDF5 keys"),
        ({"camera": {}}, "unknown field(s) ['camera']"),
        ({"language_key": "task"}, "must start with 'annotation.'"),
    ],
)
def test_bad_column_maps(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        ColumnMap.from_dict(data)


@pytest.mark.parametrize(
    ("flags", "message"),
    [({"cameras": ["table_cam"]}, "KEY=NAME"), ({"action_splits": ["arm=0-6"]}, "NAME=START:END")],
)
def test_bad_cli_flags(flags: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ColumnMap().with_flags(**flags)


def test_conversion_errors(tmp_path: Path) -> None:
    write_robomimic(tmp_path / "demos.hdf5", {0: 4})
    with pytest.raises(ConversionError, match=r"demo_0: no dataset 'obs/missing' \(available under obs/: \["):
        convert_hdf5_to_lerobot(tmp_path / "demos.hdf5", tmp_path / "a", ColumnMap(state=["missing"]), progress=False)
    with pytest.raises(ConversionError, match=r"need \(T, >=9\) actions, got shape \(4, 7\)"):
        convert_hdf5_to_lerobot(
            tmp_path / "demos.hdf5", tmp_path / "b", ColumnMap(actions={"x": (0, 9)}), progress=False
        )
    with pytest.raises(ConversionError, match="looks like 'robomimic'"):
        convert_hdf5_to_lerobot(tmp_path / "demos.hdf5", tmp_path / "c", layout="isaaclab_mimic", progress=False)
    with pytest.raises(ConversionError, match="cameras must be uint8"):
        convert_hdf5_to_lerobot(
            tmp_path / "demos.hdf5", tmp_path / "d", ColumnMap(cameras={"eef_pos": "bad"}), progress=False
        )
    with pytest.raises(ConversionError, match=r"eval_proportion must be in \[0, 1\)"):
        convert_hdf5_to_lerobot(tmp_path / "demos.hdf5", tmp_path / "e", eval_proportion=1.5, progress=False)
    with pytest.raises(DatasetError, match="HDF5 demo file not found: .*nope.hdf5"):
        convert_hdf5_to_lerobot(tmp_path / "nope.hdf5", tmp_path / "f", progress=False)
    with h5py.File(tmp_path / "empty.hdf5", "w") as f:
        f.create_group("data").create_group("mask")
    with pytest.raises(ConversionError, match=r"no demo_N groups under data/; found \['mask'\]"):
        convert_hdf5_to_lerobot(tmp_path / "empty.hdf5", tmp_path / "g", progress=False)
    convert_hdf5_to_lerobot(tmp_path / "demos.hdf5", tmp_path / "h", progress=False)
    with pytest.raises(DatasetError, match="is not empty"):
        convert_hdf5_to_lerobot(tmp_path / "demos.hdf5", tmp_path / "h", progress=False)


def test_cli_reports_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli_main(["convert", "hdf5-to-lerobot", "--input", str(tmp_path / "x.hdf5"), "--output", str(tmp_path / "o")])
    assert rc == 2 and "HDF5 demo file not found" in capsys.readouterr().err
