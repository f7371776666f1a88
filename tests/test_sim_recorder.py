"""Recorder: robomimic-layout HDF5 that replays open-loop to success; the record CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

h5py = pytest.importorskip("h5py")
pytest.importorskip("robosuite")

from policyserve.cli.main import main  # noqa: E402
from policyserve.sim import make_env  # noqa: E402
from policyserve.sim.recorder import load_demo_obs, load_demo_state, obs_max_abs_diff, record_demos  # noqa: E402

pytestmark = pytest.mark.sim


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("demos") / "lift.hdf5"
    summary = record_demos("lift", 2, path, camera_names=("table_cam",), camera_size=(32, 32), seed=3, progress=False)
    assert summary["demos"] == 2 and summary["successes"] >= 2
    return path


def test_layout(demo_file: Path) -> None:
    with h5py.File(demo_file, "r") as f:
        data = f["data"]
        assert sorted(data) == ["demo_0", "demo_1"]
        args = json.loads(data.attrs["env_args"])
        assert args["env_name"] == "Lift" and args["env_kwargs"]["camera_size"] == [32, 32]
        assert data.attrs["task"] == "lift the cube"
        total = 0
        for name in data:
            demo = data[name]
            n = int(demo.attrs["num_samples"])
            total += n
            assert demo["actions"].shape == (n, 7) and demo["states"].shape[0] == n
            assert demo["states"].dtype == np.float64
            assert demo["warmstarts"].shape[0] == n and demo["warmstarts"].dtype == np.float64
            assert bool(demo.attrs["success"]) and "<mujoco" in demo.attrs["model_file"]
            assert demo["obs/table_cam"].shape == (n, 32, 32, 3) and demo["obs/table_cam"].dtype == np.uint8
            assert demo["obs/eef_pos"].shape == (n, 3) and "task" not in demo["obs"]
            assert {"cube_pos", "cube_quat", "gripper_pos", "joint_pos", "joint_vel", "eef_quat"} <= set(demo["obs"])
        assert data.attrs["total"] == total


def test_replays_open_loop_to_success(demo_file: Path) -> None:
    env = make_env("lift", camera_names=())
    try:
        for index in (0, 1):
            with h5py.File(demo_file, "r") as f:
                actions = f[f"data/demo_{index}/actions"][:]
                states = f[f"data/demo_{index}/states"][:]
            env.reset(options={"state": load_demo_state(demo_file, index, 0)})
            errors = []
            for t, action in enumerate(actions):
                errors.append(np.abs(env.get_state()["states"] - states[t]).max())
                _, _, terminated, _, info = env.step(action)
            assert max(errors) == 0.0
            assert info["success"] and terminated
    finally:
        env.close()


def test_load_demo_state_mid_episode(demo_file: Path) -> None:
    state = load_demo_state(demo_file, 1, 5)
    assert state["step"] == 5
    env = make_env("lift", camera_names=())
    try:
        env.reset(options={"state": state})
        assert np.array_equal(env.get_state()["states"], state["states"])
        with pytest.raises(IndexError):
            load_demo_state(demo_file, 1, 10_000)
    finally:
        env.close()


def test_record_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.hdf5"
    code = main(["record", "--task", "lift", "--n-demos", "1", "--output", str(out), "--cameras", "none",
                 "--seed", "5", "--no-progress"])
    assert code == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["demos"] == 1
    with h5py.File(out, "r") as f:
        assert list(f["data"]) == ["demo_0"] and "table_cam" not in f["data/demo_0/obs"]


def test_recorded_obs_equal_obs_after_restoring_that_step(demo_file: Path) -> None:
    with h5py.File(demo_file, "r") as f:
        n = int(f["data/demo_1"].attrs["num_samples"])
        actions = f["data/demo_1/actions"][:]
    env = make_env("lift", camera_names=("table_cam",), camera_size=(32, 32))
    try:
        for step in (0, 5, n // 2):
            obs, _ = env.reset(options={"state": load_demo_state(demo_file, 1, step)})
            recorded = load_demo_obs(demo_file, 1, step)
            assert "table_cam" in recorded and "task" not in recorded
            assert obs_max_abs_diff(obs, recorded) == {key: 0.0 for key in recorded}
            for t in range(step, min(step + 3, n - 1)):  # and it goes on like the recording
                obs = env.step(actions[t])[0]
                assert set(obs_max_abs_diff(obs, load_demo_obs(demo_file, 1, t + 1)).values()) == {0.0}
        obs, _ = env.reset(seed=0)
        assert max(obs_max_abs_diff(obs, load_demo_obs(demo_file, 1, 5)).values()) > 0  # a diff can show
        with pytest.raises(ValueError, match=r"'table_cam': recorded shape \(32, 32, 3\), env gives \(16, 16, 3\)"):
            obs_max_abs_diff({"table_cam": np.zeros((16, 16, 3), np.uint8)}, load_demo_obs(demo_file, 1, 0))
    finally:
        env.close()


def test_recordings_without_warmstarts_still_restore(demo_file: Path, tmp_path: Path) -> None:
    old = tmp_path / "old.hdf5"
    old.write_bytes(demo_file.read_bytes())
    with h5py.File(old, "a") as f:
        del f["data/demo_0/warmstarts"]  # the layout before warm starts were recorded
    state = load_demo_state(old, 0, 3)
    assert "warmstart" not in state
    env = make_env("lift", camera_names=())
    try:
        env.reset(options={"state": state})
        assert np.array_equal(env.get_state()["states"], state["states"])
    finally:
        env.close()


def test_record_with_no_successful_demo_fails_clearly(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "none.hdf5"
    done = subprocess.run([sys.executable, "-m", "policyserve", "record", "--task", "lift", "--n-demos", "1",
                           "--camera-size", "32", "--max-episode-steps", "5",
                           "--output", str(out)], capture_output=True, text=True, timeout=240)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith("error: no successful lift demo in 13 attempts of at most "
                                                           "5 steps")
    assert "Traceback" not in done.stderr and not out.exists()
