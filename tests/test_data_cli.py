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


def test_dataset_info_json(gr1_dataset_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["dataset", "info", "--json", str(gr1_dataset_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [e["length"] for e in summary["episodes"]] == [416, 470, 470, 412, 328]
    assert summary["modality"]["action"]["left_hand"] == {"column": "action", "start": 7, "end": 13}
    assert summary["features"]["observation.images.egoview"]["shape"] == [800, 1280, 3]


def test_dataset_info_missing_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["dataset", "info", str(tmp_path / "nope")]) == 1
    assert "not a LeRobot dataset" in capsys.readouterr().err
