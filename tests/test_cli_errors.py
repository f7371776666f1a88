"""Every CLI command answers bad input with one ``error: ...`` line on stderr and a non-zero exit code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from policyserve.cli.main import error_line
from policyserve.cli.main import main as cli_main
from policyserve.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def bad_files(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "not_hdf5.json").write_text('{"a": 1}')
    broken = tmp_path / "broken_dataset"
    (broken / "meta").mkdir(parents=True)
    (broken / "meta/info.json").write_text("{not json")
    return {"json": tmp_path / "not_hdf5.json", "broken": broken, "tmp": tmp_path}


CASES = {
    "serve": (lambda f: ["serve", "--dataset-path", str(f["json"]), "--port", "0"], "not a LeRobot dataset"),
    "dataset info": (lambda f: ["dataset", "info", str(f["broken"])], "info.json is not valid JSON"),
    "convert": (
        lambda f: ["convert", "hdf5-to-lerobot", "--input", str(f["json"]), "--output", str(f["tmp"] / "out")],
        "not_hdf5.json is not a readable HDF5 file",
    ),
    "record": (lambda f: ["record", "--n-demos", "0", "--output", str(f["tmp"] / "d.hdf5")],
               "--n-demos must be at least 1, got 0"),
    "record to a folder": (lambda f: ["record", "--output", str(f["tmp"])], "is a directory"),
    "train": (lambda f: ["train", "--dataset-path", str(f["json"]), "--output-dir", str(f["tmp"] / "t")],
              "not a LeRobot dataset"),
    "rollout": (lambda f: ["rollout", "--policy", "scripted", "--n-envs", "0"], "n_envs must be a positive integer"),
    "compare": (lambda f: ["compare", "--hdf5-path", str(f["tmp"] / "missing.hdf5")], "HDF5 demo file not found"),
    "demo": (lambda f: ["demo", "--n-demos", "0", "--output", str(f["tmp"] / "demo")],
             "--n-demos must be at least 1, got 0"),
    "demo model steps": (lambda f: ["demo", "--model-steps", "-1", "--output", str(f["tmp"] / "demo")],
                         "--model-steps must be at least 0, got -1"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_error_line(name: str, bad_files, capsys: pytest.CaptureFixture[str]) -> None:
    argv, message = CASES[name]
    rc = cli_main(argv(bad_files))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "\r" not in line]  # tqdm bars use \r
    assert rc != 0, err
    assert lines and lines[-1].startswith("error: ") and message in lines[-1], err
    assert "Traceback" not in err and sum(line.startswith("error: ") for line in lines) == 1


def test_the_installed_entry_point_prints_no_traceback(bad_files) -> None:
    """The issue's case through ``python -m policyserve``: a JSON file given to the converter."""
    run = subprocess.run(
        [sys.executable, "-m", "policyserve", "convert", "hdf5-to-lerobot", "--input", str(bad_files["json"]),
         "--output", str(bad_files["tmp"] / "o"), "--no-progress"],
        capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [
        f"error: {bad_files['json']} is not a readable HDF5 file (Unable to synchronously open file "
        "(file signature not found))"
    ]


def test_error_line() -> None:
    assert error_line(ConfigError("bad\n  thing")) == "bad thing"
    assert error_line(FileNotFoundError(2, "No such file or directory", "x.json")) == (
        "FileNotFoundError: [Errno 2] No such file or directory: 'x.json'"
    )
    assert error_line(ValueError()) == "ValueError: (no message)"


def test_central_handler_catches_what_a_command_does_not(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An OSError the convert command does not catch itself: --output inside a regular file."""
    from test_data_convert import write_robomimic

    write_robomimic(tmp_path / "demos.hdf5", {0: 3})
    out = tmp_path / "demos.hdf5" / "dataset"
    assert cli_main(["convert", "hdf5-to-lerobot", "--input", str(tmp_path / "demos.hdf5"), "--output", str(out),
                     "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err == f"error: NotADirectoryError: [Errno 20] Not a directory: '{out / 'meta'}'\n"
