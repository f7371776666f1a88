"""LeRobot reader: real gr1.PickNPlace (v2.0 + modality.json), a v3.0 dataset, a v2.1 set without modality.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from policyserve.data.lerobot import DatasetError, LeRobotDataset
from policyserve.data.lerobot_writer import LeRobotWriter
from policyserve.data.video import encode_video

GR1_LENGTHS = [416, 470, 470, 412, 328]
GR1_GROUPS = {"left_arm": 7, "left_hand": 6, "left_leg": 6, "neck": 3, "right_arm": 7, "right_hand": 6,
              "right_leg": 6, "waist": 3}
GR1_VIDEO = "ego_view_bg_crop_pad_res256_freq20"
TASK_KEY = "annotation.human.action.task_description"


@pytest.fixture(scope="module")
def gr1(gr1_dataset_path: Path) -> LeRobotDataset:
    return LeRobotDataset(gr1_dataset_path)


def _copy_without(src: Path, dst: Path, *, videos: bool = True, modality: bool = True) -> Path:
    """A copy of a dataset (data symlinked) optionally lacking videos/ or meta/modality.json."""
    dst.mkdir()
    (dst / "data").symlink_to(src / "data")
    if videos:
        (dst / "videos").symlink_to(src / "videos")
    shutil.copytree(src / "meta", dst / "meta")
    if not modality:
        (dst / "meta/modality.json").unlink()
    return dst


def test_gr1_episodes_tasks_and_keys(gr1: LeRobotDataset) -> None:
    assert gr1.version == "v2.0" and gr1.fps == 20.0
    assert gr1.episode_indices == [0, 1, 2, 3, 4] and gr1.num_episodes == 5
    assert [gr1.episode_length(i) for i in gr1.episode_indices] == GR1_LENGTHS
    assert gr1.tasks[0] == "pick the pear from the counter and place it in the plate" and gr1.tasks[1] == "valid"
    assert gr1.action_keys == list(GR1_GROUPS) and gr1.state_keys == list(GR1_GROUPS)
    assert gr1.video_keys == [GR1_VIDEO]
    assert TASK_KEY in gr1.language_keys and gr1.stats is not None and "action" in gr1.stats
    assert gr1.split("train") == [0, 1, 2, 3, 4]
    with pytest.raises(DatasetError, match=r"no split 'eval'; splits: \['train'\]"):
        gr1.split("eval")


def test_gr1_actions_split_into_groups(gr1: LeRobotDataset) -> None:
    episode = gr1.load_episode(1)
    assert episode.length == 470 and episode.videos == {}
    assert {k: v.shape for k, v in episode.actions.items()} == {k: (470, d) for k, d in GR1_GROUPS.items()}
    assert all(v.dtype == np.float32 for v in episode.actions.values())
    raw = gr1.read_columns(1, ["action"])["action"]
    assert raw.shape == (470, 44) and raw.dtype == np.float64
    exact = gr1.load_episode(1, dtype=None)
    np.testing.assert_array_equal(np.concatenate(list(exact.actions.values()), axis=1), raw)
    assert exact.language[TASK_KEY] == ["pick the sweet potato from the counter and place it in the plate"] * 470
    assert set(exact.language["annotation.human.validity"]) == {"valid"}


def test_gr1_video_decodes(gr1: LeRobotDataset) -> None:
    episode = gr1.load_episode(4, video_keys=None)
    assert episode.videos[GR1_VIDEO].shape == (328, 256, 256, 3) and episode.videos[GR1_VIDEO].dtype == np.uint8


def test_actions_read_without_videos(gr1_dataset_path: Path, tmp_path: Path) -> None:
    ds = LeRobotDataset(_copy_without(gr1_dataset_path, tmp_path / "novideo", videos=False))
    assert ds.load_actions(3)["waist"].shape == (412, 3)
    assert ds.load_episode(3, video_keys=None).videos == {}
    with pytest.raises(DatasetError, match=f"video '{GR1_VIDEO}' .* of episode 3 not found"):
        ds.load_episode(3, video_keys=[GR1_VIDEO])


def test_gr1_without_modality_json_derives_keys(gr1_dataset_path: Path, tmp_path: Path) -> None:
    ds = LeRobotDataset(_copy_without(gr1_dataset_path, tmp_path / "nomod", modality=False))
    assert ds.modality.derived
    assert ds.action_keys == ["action"] and ds.state_keys == ["state"]
    assert ds.video_keys == ["egoview", "ego_view"]  # the declared-but-missing feature is tolerated
    assert not ds.has_video("egoview", 0) and ds.has_video("ego_view", 0)
    assert ds.load_actions(0)["action"].shape == (416, 44)
    assert ds.infer_modality_configs(8)["language"].modality_keys == [TASK_KEY]


def test_errors_name_the_problem(gr1: LeRobotDataset, gr1_dataset_path: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"episode_index 7 is not in dataset .* 5 episodes with indices 0..4"):
        gr1.load_episode(7)
    with pytest.raises(DatasetError, match=r"action key\(s\) \['arm'\] not in dataset"):
        gr1.load_actions(0, ["arm"])
    with pytest.raises(DatasetError, match="video key 'front' not in dataset"):
        gr1.load_video(0, "front")
    with pytest.raises(DatasetError, match="not a LeRobot dataset"):
        LeRobotDataset(tmp_path)
    bad = _copy_without(gr1_dataset_path, tmp_path / "badcol")
    modality = {"action": {"x": {"start": 0, "end": 2, "original_key": "act"}}}
    (bad / "meta/modality.json").write_text(json.dumps(modality))
    with pytest.raises(DatasetError, match=r"has no column\(s\) \['act'\]; columns: \["):
        LeRobotDataset(bad).load_actions(0)
    (bad / "meta/modality.json").write_text("{not json")
    with pytest.raises(DatasetError, match="modality.json is not valid JSON"):
        LeRobotDataset(bad)
    (bad / "meta/episodes.jsonl").unlink()
    (bad / "meta/modality.json").unlink()
    with pytest.raises(DatasetError, match="has no meta/episodes.jsonl"):
        LeRobotDataset(bad)


def test_v21_without_modality_json(tmp_path: Path) -> None:
    writer = LeRobotWriter(tmp_path / "ds", fps=10)
    rng = np.random.default_rng(0)
    actions = {}
    for index, length in ((3, 6), (10, 4)):  # non-contiguous episode indices
        actions[index] = rng.normal(size=(length, 5)).astype(np.float32)
        writer.add_episode(
            index,
            {"observation.state": rng.normal(size=(length, 2)), "observation.gripper": rng.normal(size=(length, 1)),
             "action": actions[index]},
            tasks=[f"task {index}"],
            videos={"observation.images.front": np.full((length, 16, 16, 3), 10 * index, np.uint8)},
        )
    writer.finish()
    ds = LeRobotDataset(tmp_path / "ds")
    assert ds.version == "v2.1" and ds.modality.derived
    assert ds.episode_indices == [3, 10] and ds.episode_length(10) == 4
    assert ds.state_keys == ["state", "gripper"] and ds.action_keys == ["action"] and ds.video_keys == ["front"]
    assert ds.language_keys == ["task"]
    episode = ds.load_episode(10, video_keys=["front"])
    np.testing.assert_array_equal(episode.actions["action"], actions[10])
    assert episode.language["task"] == ["task 10"] * 4 and episode.videos["front"].shape == (4, 16, 16, 3)
    configs = ds.infer_modality_configs(4)
    assert configs["action"].delta_indices == [0, 1, 2, 3] and configs["language"].modality_keys == ["task"]
    assert (tmp_path / "ds/meta/episodes_stats.jsonl").is_file()


def _write_v3(root: Path) -> dict[int, np.ndarray]:
    """A LeRobot v3.0 dataset: episodes 0 and 5 share file-000, episode 9 is in file-001; one camera."""
    fps, lengths = 10, {0: 5, 5: 3, 9: 4}
    layout = {0: (0, 0.0), 5: (0, 0.5), 9: (1, 0.0)}  # episode -> (file index, start time in that file)
    colors = {0: 40, 5: 240, 9: 140}
    (root / "meta/episodes/chunk-000").mkdir(parents=True)
    features = {
        "observation.state": {"dtype": "float32", "shape": [3]},
        "action": {"dtype": "float64", "shape": [2]},
        "observation.images.top": {"dtype": "video", "shape": [16, 16, 3]},
        "task_index": {"dtype": "int64", "shape": [1]},
        "episode_index": {"dtype": "int64", "shape": [1]},
        "index": {"dtype": "int64", "shape": [1]},
    }
    info = {"codebase_version": "v3.0", "fps": fps, "chunks_size": 1000, "features": features,
            "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
            "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"}
    (root / "meta/info.json").write_text(json.dumps(info))
    tasks = pa.table({"task_index": [0, 1], "__index_level_0__": ["open the door", "close the door"]})
    pq.write_table(tasks, root / "meta/tasks.parquet")
    actions, rows, episode_rows, frames = {}, {0: [], 1: []}, [], {0: [], 1: []}
    index = 0
    for ep, length in lengths.items():
        file, start = layout[ep]
        actions[ep] = np.arange(length * 2, dtype=np.float64).reshape(length, 2) + ep * 100 + 0.1
        for i in range(length):
            rows[file].append({"observation.state": [float(ep)] * 3, "action": actions[ep][i].tolist(),
                               "task_index": ep % 2, "episode_index": ep, "index": index})
            index += 1
        frames[file].append(np.full((length, 16, 16, 3), colors[ep], np.uint8))
        episode_rows.append({
            "episode_index": ep, "tasks": ["open the door" if ep % 2 == 0 else "close the door"], "length": length,
            "data/chunk_index": 0, "data/file_index": file,
            "dataset_from_index": index - length, "dataset_to_index": index,
            "videos/observation.images.top/chunk_index": 0, "videos/observation.images.top/file_index": file,
            "videos/observation.images.top/from_timestamp": start,
            "videos/observation.images.top/to_timestamp": start + length / fps,
        })
    for file in (0, 1):
        path = root / f"data/chunk-000/file-{file:03d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows[file]), path)
        video = root / f"videos/observation.images.top/chunk-000/file-{file:03d}.mp4"
        encode_video(np.concatenate(frames[file]), video, fps)
    pq.write_table(pa.Table.from_pylist(episode_rows), root / "meta/episodes/chunk-000/file-000.parquet")
    return actions


def test_v3_dataset(tmp_path: Path) -> None:
    actions = _write_v3(tmp_path / "v3")
    ds = LeRobotDataset(tmp_path / "v3")
    assert ds.version == "v3.0" and ds.fps == 10
    assert ds.episode_indices == [0, 5, 9] and [ds.episode_length(i) for i in ds.episode_indices] == [5, 3, 4]
    assert ds.tasks == {0: "open the door", 1: "close the door"}
    assert ds.episode_tasks(5) == ["close the door"]
    for ep, expected in actions.items():
        np.testing.assert_array_equal(ds.read_columns(ep, ["action"])["action"], expected)
    episode = ds.load_episode(5, video_keys=["top"])
    assert episode.length == 3 and episode.language["task"] == ["close the door"] * 3
    np.testing.assert_array_equal(episode.states["state"], np.full((3, 3), 5, np.float32))
    video = episode.videos["top"]
    assert video.shape == (3, 16, 16, 3) and abs(float(video.mean()) - 240) < 6  # episode 5's frames, not 0's
    assert abs(float(ds.load_video(0, "top").mean()) - 40) < 6 and len(ds.load_video(9, "top")) == 4
    assert abs(float(ds.load_video(9, "top").mean()) - 140) < 6
    with pytest.raises(DatasetError, match=r"episode_index 1 is not in dataset .* indices \[0, 5, 9\]"):
        ds.load_actions(1)
