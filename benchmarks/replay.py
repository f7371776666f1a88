"""Replay and converter benchmark.

- ReplayPolicy.get_action latency on gr1.PickNPlace (in process, batch 1 and 8);
- time to switch episode (reset to another episode: cold = first visit reads its parquet actions, warm = cached)
  against decoding that episode's video, which upstream's loader does on every episode load; prints the ratio;
- HDF5 -> LeRobot converter throughput (frames per second, v2.1 and v3.0) on a generated robomimic file with
  two cameras.

Run: ``python benchmarks/replay.py [--dataset-path PATH]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATASET = REPO.parent / "shared" / "datasets" / "gr1.PickNPlace"


def _ms(seconds: list[float]) -> str:
    values = sorted(s * 1e3 for s in seconds)
    p99 = values[min(len(values) - 1, int(0.99 * len(values)))]
    return f"median {statistics.median(values):.3f} ms, p99 {p99:.3f} ms (n={len(values)})"


def bench_get_action(dataset_path: Path, calls: int) -> None:
    from policyserve.policies.replay import make_replay_policy

    policy = make_replay_policy(dataset_path, 1)
    for batch in (1, 8):
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            policy.get_action(None, {"batch_size": batch})
            times.append(time.perf_counter() - start)
        print(f"get_action (batch {batch}, H={policy.action_horizon}, {len(policy.action_keys)} keys): {_ms(times)}")


def bench_episode_switch(dataset_path: Path) -> None:
    from policyserve.data.lerobot import LeRobotDataset
    from policyserve.policies.replay import make_replay_policy

    dataset = LeRobotDataset(dataset_path)
    policy = make_replay_policy(dataset_path, 8)
    first = dataset.episode_indices[0]
    others = dataset.episode_indices[1:] or [first]
    cold, warm, decode = [], [], []
    for episode in others:
        start = time.perf_counter()
        policy.reset({"episode_index": episode})
        cold.append(time.perf_counter() - start)
    for episode in others * 5:
        start = time.perf_counter()
        policy.reset({"episode_index": episode})
        warm.append(time.perf_counter() - start)
    video_key = next((k for k in dataset.video_keys if dataset.has_video(k, others[0])), None)
    if video_key is None:
        print("episode switch: no video files to compare against")
        return
    frames = 0
    for episode in others:
        start = time.perf_counter()
        frames += len(dataset.load_video(episode, video_key))
        decode.append(time.perf_counter() - start)
    print(f"episode switch, cold (read parquet actions): {_ms(cold)}")
    print(f"episode switch, warm (cached actions):       {_ms(warm)}")
    print(f"decode the episode's video ({video_key}, {frames / len(others):.0f} frames avg): {_ms(decode)}")
    ratio_cold = statistics.median(decode) / statistics.median(cold)
    ratio_warm = statistics.median(decode) / statistics.median(warm)
    print(f"ratio video decode / episode switch: {ratio_cold:.1f}x (cold), {ratio_warm:.0f}x (warm)")


def _write_hdf5(path: Path, demos: int, length: int, size: int) -> None:
    import h5py

    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["task"] = "lift the cube"
        for n in range(demos):
            demo = data.create_group(f"demo_{n}")
            demo["actions"] = rng.normal(size=(length, 7))
            demo["states"] = rng.normal(size=(length, 30))
            for key, dim in (("eef_pos", 3), ("eef_quat", 4), ("gripper_pos", 2)):
                demo[f"obs/{key}"] = rng.normal(size=(length, dim)).astype(np.float32)
            # smooth moving images: closer to camera frames than noise (noise is h264's worst case)
            base = np.linspace(0, 255, size, dtype=np.float32)
            t = np.arange(length, dtype=np.float32)[:, None, None]
            img = ((base[None, :, None] + base[None, None, :] + 3 * t) % 256).astype(np.uint8)
            demo["obs/table_cam"] = np.repeat(img[..., None], 3, axis=3)
            demo["obs/wrist_cam"] = np.repeat(img[:, ::-1, :, None], 3, axis=3)


def bench_converter(demos: int, length: int, size: int) -> None:
    from policyserve.data.hdf5_to_lerobot import convert_hdf5_to_lerobot

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "demos.hdf5"
        _write_hdf5(path, demos, length, size)
        for fmt in ("v2.1", "v3.0"):
            summary = convert_hdf5_to_lerobot(path, Path(tmp) / fmt, progress=False, format=fmt)
            print(
                f"converter ({fmt}): {summary.num_episodes} demos x {length} frames, 2 cameras {size}x{size}: "
                f"{summary.seconds:.2f} s, {summary.frames_per_second:.0f} frames/s"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset-path", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--demos", type=int, default=4)
    parser.add_argument("--length", type=int, default=150)
    parser.add_argument("--image-size", type=int, default=128)
    args = parser.parse_args()
    bench_get_action(args.dataset_path, args.calls)
    bench_episode_switch(args.dataset_path)
    bench_converter(args.demos, args.length, args.image_size)


if __name__ == "__main__":
    main()
