"""LeRobot v3.0 output of the converter: layout, episode index, video time ranges, tasks, stats (video included),
demo gaps numbered 0..N-1, and our reader + replay server reading v3.0 exactly like v2.1."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from policyserve.data.hdf5_to_lerobot import convert_hdf5_to_lerobot
from policyserve.data.lerobot import DatasetError, LeRobotDataset
from policyserve.data.lerobot_writer import LeRobotWriter
from policyserve.data.stats import channel_histogram, histogram_stats
from policyserve.policies.replay import ReplayError, make_replay_policy
from policyserve.client.policy_client import PolicyClient
from policyserve.serving.server import PolicyServer
from policyserve.errors import ServerError
from test_data_convert import write_robomimic

GAP = {0: 9, 5: 7, 6: 11}  # demo_0, demo_5, demo_6 -> episodes 0, 1, 2
CAMERAS = ("observation.images.ego_view", "observation.images.wrist_view")
STATS = {"mean", "std", "min", "max", "q01", "q99", "count"}


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, dict[str, np.ndarray]]]:
    """The gap file converted to v2.1 and v3.0 (v3.0 with tiny file limits, so episodes spread over files)."""
    root = tmp_path_factory.mktemp("v30")
    arrays = write_robomimic(root / "gap.hdf5", GAP)
    convert_hdf5_to_lerobot(root / "gap.hdf5", root / "v2.1", progress=False, format="v2.1")
    convert_hdf5_to_lerobot(root / "gap.hdf5", root / "v3.0", progress=False, format="v3.0")
    return root, arrays


def _episodes(root: Path) -> list[dict]:
    return pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet").to_pylist()


def test_v30_layout_and_info(converted) -> None:
    root, arrays = converted
    v3 = root / "v3.0"
    info = json.loads((v3 / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == 20 and isinstance(info["fps"], int)
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert info["video_path"] == "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    assert info["total_episodes"] == 3 and info["total_frames"] == sum(GAP.values()) and info["total_tasks"] == 1
    assert {"chunks_size", "data_files_size_in_mb", "video_files_size_in_mb"} <= set(info)
    assert "total_chunks" not in info and "total_videos" not in info and info["splits"] == {"train": "0:3"}
    for name, feature in info["features"].items():
        assert "names" in feature
        if feature["dtype"] == "video":
            assert feature["info"]["video.fps"] == 20 and feature["info"]["video.height"] == 32
        else:
            assert feature["fps"] == 20
    assert (v3 / "data/chunk-000/file-000.parquet").is_file()
    assert all((v3 / f"videos/{c}/chunk-000/file-000.mp4").is_file() for c in CAMERAS)
    # GR00T's modality and the demo map travel with the dataset
    assert (v3 / "meta/modality.json").read_text() == (root / "v2.1/meta/modality.json").read_text()
    demo_map = json.loads((v3 / "meta/hdf5_demo_map.json").read_text())["demo_to_episode"]
    assert demo_map == {"demo_0": 0, "demo_5": 1, "demo_6": 2}
    assert not list(v3.glob("meta/*.jsonl")) and not list(v3.glob("data/*/episode_*"))


def test_v30_episode_rows_video_ranges_and_tasks(converted) -> None:
    root, arrays = converted
    v3 = root / "v3.0"
    data = pq.read_table(v3 / "data/chunk-000/file-000.parquet")
    rows = _episodes(v3)
    assert [r["episode_index"] for r in rows] == [0, 1, 2]
    start = 0
    for row, (demo, length) in zip(rows, GAP.items(), strict=True):
        assert row["length"] == length and row["tasks"] == ["lift the cube"]
        assert (row["dataset_from_index"], row["dataset_to_index"]) == (start, start + length)
        block = data.slice(start, length)
        assert block["episode_index"].to_pylist() == [row["episode_index"]] * length
        assert block["frame_index"].to_pylist() == list(range(length))
        assert np.array_equal(np.stack(block["action"].to_numpy(zero_copy_only=False)), arrays[demo]["actions"])
        for camera in CAMERAS:
            assert row[f"videos/{camera}/from_timestamp"] == pytest.approx(start / 20)
            assert row[f"videos/{camera}/to_timestamp"] == pytest.approx((start + length) / 20)
        assert row["meta/episodes/chunk_index"] == 0 and row["meta/episodes/file_index"] == 0
        start += length
    tasks = pq.read_table(v3 / "meta/tasks.parquet")
    assert tasks["task_index"].to_pylist() == [0] and tasks["task"].to_pylist() == ["lift the cube"]
    # LeRobot reads it with pandas: the task text is the DataFrame index
    assert json.loads(tasks.schema.metadata[b"pandas"])["index_columns"] == ["task"]


def test_video_stats_both_formats(converted) -> None:
    root, arrays = converted
    ego = np.concatenate([a["table_cam"] for a in arrays.values()])
    for fmt in ("v2.1", "v3.0"):
        stats = json.loads((root / fmt / "meta/stats.json").read_text())
        for camera in CAMERAS:
            assert set(stats[camera]) == STATS, (fmt, camera)
            for name in STATS - {"count"}:
                assert np.asarray(stats[camera][name]).shape == (3, 1, 1), (fmt, camera, name)
            assert stats[camera]["count"] == [sum(GAP.values())]
        pixels = ego.reshape(-1, 3) / 255.0
        np.testing.assert_allclose(np.ravel(stats[CAMERAS[0]]["mean"]), pixels.mean(0), rtol=1e-9)
        np.testing.assert_allclose(np.ravel(stats[CAMERAS[0]]["std"]), pixels.std(0), rtol=1e-6)
        np.testing.assert_allclose(np.ravel(stats[CAMERAS[0]]["min"]), pixels.min(0))
        np.testing.assert_allclose(np.ravel(stats[CAMERAS[0]]["max"]), pixels.max(0))
        assert set(stats) >= {"action", "observation.state", "timestamp", *CAMERAS}
    per_episode = [json.loads(line)["stats"] for line in (root / "v2.1/meta/episodes_stats.jsonl").read_text().splitlines()]
    for stats, row, demo in zip(per_episode, _episodes(root / "v3.0"), GAP, strict=True):
        frames = arrays[demo]["table_cam"].reshape(-1, 3) / 255.0
        np.testing.assert_allclose(np.ravel(stats[CAMERAS[0]]["mean"]), frames.mean(0), rtol=1e-9)
        assert stats[CAMERAS[0]]["count"] == [GAP[demo]]
        assert row[f"stats/{CAMERAS[0]}/mean"] == stats[CAMERAS[0]]["mean"]
        assert row["stats/action/count"] == [GAP[demo]] and np.allclose(row["stats/action/mean"],
                                                                        arrays[demo]["actions"].mean(0))


def test_histogram_quantiles_and_bad_input() -> None:
    frames = np.zeros((2, 10, 10, 3), np.uint8)
    frames[:, :, :, 1] = np.arange(100, dtype=np.uint8).reshape(10, 10)
    stats = histogram_stats(channel_histogram(frames), 2)
    assert stats["q01"][1] == [[0.0]] and stats["q99"][1] == [[98 / 255]] and stats["max"][1] == [[99 / 255]]
    assert stats["std"][0] == [[0.0]] and stats["count"] == [2]
    with pytest.raises(ValueError, match=r"uint8 \(N, H, W, 3\)"):
        channel_histogram(np.zeros((2, 4, 4), np.uint8))


def test_reader_reads_v30_like_v21(converted) -> None:
    root, _ = converted
    v2, v3 = LeRobotDataset(root / "v2.1"), LeRobotDataset(root / "v3.0")
    assert (v2.version, v3.version) == ("v2.1", "v3.0")
    assert v3.episode_indices == v2.episode_indices == [0, 1, 2] and v3.tasks == v2.tasks
    assert v3.video_keys == v2.video_keys and v3.state_keys == v2.state_keys and v3.action_keys == v2.action_keys
    for e in v2.episode_indices:
        a, b = v2.load_episode(e, video_keys=None, dtype=None), v3.load_episode(e, video_keys=None, dtype=None)
        assert a.length == b.length and a.tasks == b.tasks and a.language == b.language
        for key in a.actions:
            assert np.array_equal(a.actions[key], b.actions[key])
        for key in a.states:
            assert np.array_equal(a.states[key], b.states[key])
        for key in a.videos:  # h264 encodes the shared file differently, but every frame is the same frame
            assert a.videos[key].shape == b.videos[key].shape
            x, y = a.videos[key].astype(float), b.videos[key].astype(float)
            for t in range(a.length):
                same = np.abs(x[t] - y[t]).mean()
                assert all(same < np.abs(x[s] - y[t]).mean() for s in (t - 1, t + 1) if 0 <= s < a.length)


def test_v30_spread_over_several_files(tmp_path: Path) -> None:
    """With tiny size limits each episode gets its own data and video file; reading still finds every frame.

    (Episodes are long enough for the h264 encoder to have emitted packets, which the video limit counts.)"""
    rng = np.random.default_rng(0)
    writer = LeRobotWriter(tmp_path / "ds", fps=10, version="v3.0", data_files_size_in_mb=1e-6,
                           video_files_size_in_mb=1e-6)
    episodes = {}
    for e, length in enumerate((60, 64, 62)):
        episodes[e] = (rng.normal(size=(length, 3)), rng.integers(0, 255, (length, 16, 16, 3), dtype=np.uint8))
        writer.add_episode(e, {"action": episodes[e][0]}, tasks=[f"task {e % 2}"],
                           videos={"observation.images.cam": episodes[e][1]})
    writer.finish()
    rows = _episodes(tmp_path / "ds")
    assert [r["data/file_index"] for r in rows] == [0, 1, 2]
    assert [r["videos/observation.images.cam/file_index"] for r in rows] == [0, 1, 2]
    assert [r["videos/observation.images.cam/from_timestamp"] for r in rows] == [0.0, 0.0, 0.0]
    assert [r["dataset_from_index"] for r in rows] == [0, 60, 124]
    ds = LeRobotDataset(tmp_path / "ds")
    assert ds.tasks == {0: "task 0", 1: "task 1"}
    for e, (actions, frames) in episodes.items():
        assert np.array_equal(ds.load_actions(e, dtype=None)["action"], actions)
        assert ds.load_video(e, "cam").shape == frames.shape
        assert ds.read_columns(e, ["index"])["index"].tolist() == list(range(rows[e]["dataset_from_index"],
                                                                            rows[e]["dataset_to_index"]))


def test_v30_writer_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="v3.0 needs an integer fps, got 12.5"):
        LeRobotWriter(tmp_path / "a", fps=12.5, version="v3.0")
    with pytest.raises(DatasetError, match=r"format must be one of \('v2.1', 'v3.0'\), got 'v4'"):
        LeRobotWriter(tmp_path / "b", fps=10, version="v4")
    writer = LeRobotWriter(tmp_path / "c", fps=10, version="v3.0")
    with pytest.raises(DatasetError, match="numbered 0..N-1 in order: expected episode 0, got 3"):
        writer.add_episode(3, {"action": np.zeros((4, 2))}, tasks=["t"])


def test_demo_index_through_the_map(converted) -> None:
    root, arrays = converted
    for fmt in ("v2.1", "v3.0"):
        ds = LeRobotDataset(root / fmt)
        assert [ds.episode_for_demo(d) for d in (0, 5, 6)] == [0, 1, 2]
        with pytest.raises(DatasetError, match=r"demo_1 is not in dataset .* lists 3 demos: demo_0, demo_5, demo_6"):
            ds.episode_for_demo(1)
        policy = make_replay_policy(root / fmt, 1, embodiment_tag="franka_panda")
        info = policy.reset({"demo_index": 5, "step_index": 2})
        assert info["episode_index"] == 1 and info["current_step"] == 2 and info["episode_length"] == GAP[5]
        action, _ = policy.get_action(None)
        assert np.array_equal(action["arm"][0, 0], arrays[5]["actions"][2, :6].astype(np.float32))
        info = policy.reset({"demo_index": [6, 0]})
        assert info["episode_index"] == [2, 0]
        with pytest.raises(ReplayError, match="either options\\['episode_index'\\] or options\\['demo_index'\\]"):
            policy.reset({"demo_index": 5, "episode_index": 1})
        assert policy.reset()["episode_index"] == [2, 0]  # a refused reset changed nothing
    # a dataset without a demo map: demo N is episode N
    v1 = LeRobotWriter(root / "nomap", fps=10)
    v1.add_episode(0, {"action": np.zeros((3, 2))}, tasks=["t"])
    v1.finish()
    ds = LeRobotDataset(root / "nomap")
    assert ds.demo_map is None and ds.episode_for_demo(0) == 0
    with pytest.raises(DatasetError, match="episode_index 4 is not in dataset"):
        ds.episode_for_demo(4)


def test_replay_server_serves_v30_like_v21(converted) -> None:
    root, _ = converted
    served = {}
    for fmt in ("v2.1", "v3.0"):
        server = PolicyServer(make_replay_policy(root / fmt, 4, embodiment_tag="franka_panda"),
                              host="127.0.0.1", port=0, verbose=False)
        port = server.start()
        client = PolicyClient("127.0.0.1", port, timeout_ms=10000)
        try:
            chunks = []
            for demo in (0, 5, 6):
                chunks.append(client.reset({"demo_index": demo}))
                for _ in range(3):
                    action, info = client.get_action(None, {"batch_size": 2})
                    info.pop("server_timing", None)
                    chunks.append((info, {k: v.tolist() for k, v in action.items()}))
            with pytest.raises(ServerError, match="demo_3 is not in dataset"):
                client.reset({"demo_index": 3})
            assert client.get_action(None, {"batch_size": 1})[1]["episode_index"] == 2  # still serving
            served[fmt] = chunks
        finally:
            client.close()
            server.stop()
    assert served["v3.0"] == served["v2.1"]
