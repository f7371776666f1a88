"""Every CLI command answers bad input with one ``error: ...`` line on stderr and exit code 2 (one table in
``policyserve.cli.main``: bad input 2, a failure while running 1, Ctrl-C 130); flags take GR00T's spellings."""

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
    # the library names the field (n_envs), the CLI its flag
    "rollout": (lambda f: ["rollout", "--policy", "scripted", "--n-envs", "0"], "--n-envs must be a positive integer"),
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
    assert rc == 2, err  # bad input: 2 for every command (dataset info and convert answered 1 before the table)
    assert lines and lines[-1].startswith("error: ") and message in lines[-1], err
    assert "Traceback" not in err and sum(line.startswith("error: ") for line in lines) == 1


def test_the_installed_entry_point_prints_no_traceback(bad_files) -> None:
    """The issue's case through ``python -m policyserve``: a JSON file given to the converter."""
    run = subprocess.run(
        [sys.executable, "-m", "policyserve", "convert", "hdf5-to-lerobot", "--input", str(bad_files["json"]),
         "--output", str(bad_files["tmp"] / "o"), "--no-progress"],
        capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr  # bad input (was 1 before the exit-code table)
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


def test_exit_code_table() -> None:
    """One table: bad input 2, a failure while running 1, Ctrl-C 130, bugs (other types) propagate."""
    from policyserve.cli.main import exit_code
    from policyserve.errors import PolicyTimeoutError, ServerError, ValidationError

    assert exit_code(ConfigError("x")) == 2 and exit_code(ValidationError("state", "arm", 6, 7)) == 2
    assert exit_code(ServerError("boom")) == 1 and exit_code(PolicyTimeoutError("slow")) == 1
    assert exit_code(OSError("disk")) == 1 and exit_code(KeyboardInterrupt()) == 130
    assert exit_code(TypeError("a bug")) is None


def test_parse_errors_exit_2_with_argparse_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["rollout", "--n-envs", "two"]) == 2
    err = capsys.readouterr().err
    assert "policyserve rollout: error: argument --n-envs: invalid int value: 'two'" in err
    assert cli_main(["record", "--output", "x.hdf5", "--no-such-flag"]) == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_every_command_takes_underscore_and_bool_value_spellings() -> None:
    """GR00T's and IsaacLab's scripts write --model_path, --n_episodes and --strict True."""
    from policyserve.cli.main import build_parser

    parser = build_parser()
    args = parser.parse_args(["rollout", "--n_episodes", "3", "--max_episode_steps=7", "--camera_size", "32x48",
                              "--async_inference", "True", "--demo_indices", "1", "2", "--hdf5_path", "d.hdf5"])
    assert (args.n_episodes, args.max_episode_steps, args.camera_size) == (3, 7, (32, 48))
    assert args.async_inference is True and args.demo_indices == [1, 2]
    args = parser.parse_args(["train", "--dataset_path", "d", "--output_dir", "o", "--augment", "False",
                              "--no_resume", "--learning_rate", "0.01"])
    assert (args.dataset_path, args.augment, args.resume, args.learning_rate) == ("d", False, False, 0.01)
    args = parser.parse_args(["compare", "--hdf5_path", "x.hdf5", "--no_video", "--demo_index", "2"])
    assert args.video is False and args.demo_index == 2 and args.n_action_steps == 1  # compare's own default
    assert parser.parse_args(["rollout"]).n_action_steps == 8  # DriverConfig's default
    args = parser.parse_args(["demo", "--n_demos", "2", "--quiet"])
    assert args.n_demos == 2 and args.progress is False


def test_flags_take_default_and_help_from_the_config_fields() -> None:
    from policyserve.cli.flags import field_docs
    from policyserve.cli.main import build_parser
    from policyserve.model.config import TrainConfig

    train = build_parser()._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
    actions = {a.dest: a for a in train._actions}
    doc = field_docs(TrainConfig)["max_steps"]
    assert actions["max_steps"].default == TrainConfig.max_steps
    assert actions["max_steps"].help.startswith(doc.rstrip("."))
    assert "(default 2000)" in actions["max_steps"].help
    assert train.get_default("field_flags")["learning_rate"] == "--learning-rate"


def test_library_errors_name_fields_the_cli_names_flags() -> None:
    from policyserve.cli.flags import name_flags

    flags = {"replicas": "--replicas", "n_envs": "--n-envs", "overwrite": "--overwrite", "task": "--task"}
    assert name_flags("replicas must be >= 1, got 0", flags) == "--replicas must be >= 1, got 0"
    assert name_flags("demo_indices need n_envs >= 1", flags) == "demo_indices need --n-envs >= 1"
    assert name_flags("dir x is not empty (pass overwrite=True to replace it)", flags) == (
        "dir x is not empty (pass --overwrite to replace it)")
    # one-word fields only as the message's subject; quoted keys and dotted names are left alone
    assert name_flags("task 'x' is unknown; the task of 'n_envs'", flags) == "--task 'x' is unknown; the task of 'n_envs'"


def test_bool_flag_refuses_other_values(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["demo", "--progress", "maybe"]) == 2
    assert "expected True or False, got 'maybe'" in capsys.readouterr().err


def test_every_flag_of_every_command_has_help() -> None:
    import argparse

    from policyserve.cli.main import build_parser

    missing: list[str] = []

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, child in action.choices.items():
                    walk(child, f"{name} {sub_name}")
            elif action.option_strings and not action.help:
                missing.append(f"{name} {action.option_strings[0]}")

    walk(build_parser(), "policyserve")
    assert missing == []
