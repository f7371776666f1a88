"""``policyserve dataset info``: the summary users check before serving a dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from policyserve.cli.main import main as cli_main


def test_dataset_info_text(gr1_dataset_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["dataset", "info", str(gr1_dataset_path)]) == 0
    out = capsys.readouterr().out
    assert "LeRobot v2.0, 5 episodes, 2096 frames, 20 fps" in out
    assert "  4: 328  pick the cupcake from the counter and place it in the plate; valid" in out
    assert "  observation.state: float64 [44]" in out
    assert "  video.ego_view_bg_crop_pad_res256_freq20 <- observation.images.ego_view\n" in out
    assert "  action.waist <- action[41:44]" in out
    assert "  language annotation.human.action.task_description <- annotation.human.action.task_description" in out
    # info.json declares a camera without video files and a split wider than the dataset: both said plainly
    assert "  observation.images.egoview: video [800, 1280, 3]  (no video files)\n" in out
    assert "  observation.images.ego_view: video [256, 256, 3]\n" in out
    assert "  train=0:100 -> 5 episodes (0..4)\n" in out


def test_dataset_info_json(gr1_dataset_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["dataset", "info", "--json", str(gr1_dataset_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [e["length"] for e in summary["episodes"]] == [416, 470, 470, 412, 328]
    assert summary["modality"]["action"]["left_hand"] == {"column": "action", "start": 7, "end": 13}
    assert summary["features"]["observation.images.egoview"]["shape"] == [800, 1280, 3]
    assert summary["features"]["observation.images.egoview"]["episodes_with_files"] == 0
    assert summary["features"]["observation.images.ego_view"]["episodes_with_files"] == 5
    assert summary["split_episodes"] == {"train": [0, 1, 2, 3, 4]} and summary["hdf5_demo_map"] is None


def test_dataset_info_missing_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["dataset", "info", str(tmp_path / "nope")]) == 2  # bad input (1 before the exit-code table)
    assert "not a LeRobot dataset" in capsys.readouterr().err


def test_dataset_info_converted_with_gap(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from test_data_convert import write_robomimic

    write_robomimic(tmp_path / "gap.hdf5", {0: 4, 5: 3})
    assert cli_main(["convert", "hdf5-to-lerobot", "--input", str(tmp_path / "gap.hdf5"), "--output",
                     str(tmp_path / "out"), "--format", "v3.0", "--no-progress"]) == 0
    assert "to LeRobot v3.0 dataset" in capsys.readouterr().out
    assert cli_main(["dataset", "info", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "LeRobot v3.0, 2 episodes, 7 frames, 20 fps" in out and "  train=0:2 -> 2 episodes (0..1)" in out
    assert "HDF5 demos (meta/hdf5_demo_map.json, demo -> episode_index): demo_0 -> 0, demo_5 -> 1" in out
    assert "no video files" not in out
