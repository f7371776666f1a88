"""Run by scripts/check_lerobot_compat.sh: write a small HDF5 file with a demo gap, or check a converted dataset
with LeRobot's own reader (inside the throwaway venv that has LeRobot installed).

    python lerobot_compat_check.py make-hdf5 OUT.hdf5 EXPECTED.npz
    python lerobot_compat_check.py check DATASET_ROOT EXPECTED.npz
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

DEMOS = {0: 24, 5: 18, 6: 20}  # demo_0, demo_5, demo_6: a gap, as recorders leave after dropped demos
SIZE = 96


def _frames(n: int, length: int) -> np.ndarray:
    """Smooth images with a bright square that moves every frame (so a frame off by one is detectable)."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    frames = np.empty((length, SIZE, SIZE, 3), np.uint8)
    for t in range(length):
        img = np.stack([xx * 2, yy * 2, np.full_like(xx, 40 * n % 255)], -1).astype(np.uint8)
        x0 = (7 * t) % (SIZE - 16)
        img[30:46, x0 : x0 + 16] = 255
        frames[t] = img
    return frames


def make_hdf5(path: str, expected: str) -> None:
    import h5py

    arrays = {}
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = json.dumps({"env_name": "FrankaLift"})
        data.attrs["task"] = "lift the cube"
        for n, length in DEMOS.items():
            rng = np.random.default_rng(n)
            demo = data.create_group(f"demo_{n}")
            demo["actions"] = arrays[f"actions_{n}"] = rng.normal(size=(length, 7))
            for key, dim in (("eef_pos", 3), ("eef_quat", 4), ("gripper_pos", 2)):
                demo[f"obs/{key}"] = rng.normal(size=(length, dim)).astype(np.float32)
            demo["obs/table_cam"] = arrays[f"frames_{n}"] = _frames(n, length)
            demo["obs/wrist_cam"] = _frames(n + 1, length)
    np.savez(expected, **arrays)


def check(root: str, expected_path: str) -> None:
    import lerobot
    import torch
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from lerobot.datasets.utils import dataset_to_policy_features

    expected = np.load(expected_path)
    demo_map = json.loads((Path(root) / "meta/hdf5_demo_map.json").read_text())["demo_to_episode"]
    ds = LeRobotDataset("local/policyserve_compat", root=root, video_backend="pyav")
    version = ds.meta.info["codebase_version"]
    assert ds.meta.total_episodes == len(DEMOS), ds.meta.total_episodes
    assert ds.num_frames == sum(DEMOS.values()), ds.num_frames
    got_actions: dict[int, list[np.ndarray]] = {}
    worst_video = 0.0
    for idx in range(len(ds)):
        item = ds[idx]
        episode = int(item["episode_index"])
        got_actions.setdefault(episode, []).append(item["action"].numpy())
        frame = item["observation.images.ego_view"]
        assert tuple(frame.shape) == (3, SIZE, SIZE) and frame.dtype == torch.float32, (frame.shape, frame.dtype)
        demo = next(int(d.split("_")[1]) for d, e in demo_map.items() if e == episode)
        t = int(item["frame_index"])
        source = expected[f"frames_{demo}"].astype(np.float32) / 255
        decoded = frame.numpy().transpose(1, 2, 0)
        error = np.abs(decoded - source[t]).mean()
        neighbours = [np.abs(decoded - source[s]).mean() for s in (t - 1, t + 1) if 0 <= s < len(source)]
        assert error < min(neighbours), f"episode {episode} frame {t}: decoded frame matches a neighbour better"
        worst_video = max(worst_video, error)
    for name, episode in demo_map.items():
        want = expected[f"actions_{name.split('_')[1]}"]
        got = np.stack(got_actions[episode])
        assert got.shape == want.shape and np.array_equal(got.astype(np.float32), want.astype(np.float32)), name
    features = dataset_to_policy_features(ds.meta.features)
    for key, feature in features.items():
        assert key in ds.meta.stats, f"meta.stats has no entry for {key}"
        shape = np.asarray(ds.meta.stats[key]["mean"]).shape
        if str(feature.type).endswith("VISUAL"):
            assert shape == (3, 1, 1), (key, shape)
    print(
        f"OK lerobot {lerobot.__version__} read {version} dataset {root}: {ds.meta.total_episodes} episodes "
        f"{list(demo_map.items())}, {ds.num_frames} frames, actions equal to the HDF5 file's, video decoded with "
        f"PyAV (worst mean abs error {worst_video:.3f}, every frame nearest its own source frame), "
        f"stats for {sorted(features)}"
    )


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"make-hdf5": make_hdf5, "check": check}[command](*args)
