"""``policyserve serve`` as users run it: a real process, real sockets, signals."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from policyserve import PolicyClient, UnauthorizedError

from helpers import franka_observation
from serve_process import serve_process


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_default_server_answers_and_shuts_down_cleanly(sig):
    with serve_process() as (proc, port):
        assert "Embodiment tag: franka_panda" in proc.banner and "Host: 127.0.0.1" in proc.banner
        with PolicyClient(port=port, timeout_ms=5000) as c:
            assert c.ping()
            action, _ = c.get_action(franka_observation(batch=2))
            assert action["arm"].shape == (2, 16, 6)
        proc.send_signal(sig)
        assert proc.wait(10) == 0
        assert "Shutting down server" in proc.stdout.read()


def test_api_token_from_environment():
    with serve_process(env={"POLICYSERVE_API_TOKEN": "envtok"}) as (proc, port):
        with PolicyClient(port=port, timeout_ms=5000) as anonymous:
            assert not anonymous.ping()  # ping() says False on any failure (client change, issue 17)
            with pytest.raises(UnauthorizedError):
                anonymous.call_endpoint("ping", requires_input=False)
        with PolicyClient(port=port, timeout_ms=5000, api_token="envtok") as c:
            assert c.ping()
            c.kill_server()
        assert proc.wait(10) == 0


def test_sim_policy_wrapper_flag():
    with serve_process("--use-sim-policy-wrapper", "--embodiment-tag", "LIBERO_PANDA") as (proc, port):
        with PolicyClient(port=port, timeout_ms=5000) as c:
            import numpy as np

            obs = {"video.image": np.zeros((1, 1, 8, 8, 3), np.uint8),
                   "video.wrist_image": np.zeros((1, 1, 8, 8, 3), np.uint8),
                   **{f"state.{k}": np.zeros((1, 1, 1), np.float32)
                      for k in ["x", "y", "z", "roll", "pitch", "yaw", "gripper"]},
                   "annotation.human.action.task_description": ["pick"]}
            action, _ = c.get_action(obs)
            assert "action.gripper" in action and action["action.x"].shape == (1, 16, 1)


def test_unknown_embodiment_fails_with_clear_message():
    out = subprocess.run([sys.executable, "-m", "policyserve", "serve", "--port", "0", "--embodiment-tag", "GR1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "no modality config registered for embodiment 'gr1'" in out.stderr
    assert "give the modality config as a JSON file with --modality-config-path FILE" in out.stderr


def test_gr00t_and_isaaclab_spellings_start_the_server():
    """GR00T's docs write ``--strict True``; IsaacLab's GR00T scripts pass ``--embodiment_tag`` and friends."""
    with serve_process("--strict", "False", "--embodiment_tag", "LIBERO_PANDA", "--use_sim_policy_wrapper",
                       "True", "--max_batch_size", "4") as (proc, port):
        assert "Strict: False" in proc.banner and "Embodiment tag: EmbodimentTag.LIBERO_PANDA" in proc.banner
        with PolicyClient(port=port, timeout_ms=5000) as c:
            assert "action.gripper" in {f"action.{k}" for k in c.get_modality_config()["action"].modality_keys}
            c.kill_server()
        assert proc.wait(10) == 0


@pytest.mark.parametrize("argv, strict", [([], True), (["--strict"], True), (["--strict", "True"], True),
                                          (["--strict", "false"], False), (["--no-strict"], False),
                                          (["--strict=False"], False)])
def test_strict_spellings(argv, strict):
    from policyserve.cli.main import build_parser

    assert build_parser().parse_args(["serve", *argv]).strict is strict


def test_underscore_spellings_of_gr00t_flags():
    from policyserve.cli.main import build_parser

    args = build_parser().parse_args(["serve", "--model_path", "ckpt", "--embodiment_tag", "new_embodiment",
                                      "--dataset_path", "d", "--modality_config_path", "m.json",
                                      "--execution_horizon", "8", "--use_sim_policy_wrapper", "--api_token", "t",
                                      "--max_message_mb", "2"])
    assert (args.model_path, args.embodiment_tag, args.dataset_path, args.modality_config_path) == (
        "ckpt", "new_embodiment", "d", "m.json")
    assert args.execution_horizon == 8 and args.use_sim_policy_wrapper is True and args.api_token == "t"
    assert args.max_message_mb == 2 << 20  # the flag counts MiB; ServerConfig.max_message_bytes gets bytes


def test_unregistered_tag_on_a_dataset_names_the_flags_to_use(gr1_dataset_path):
    """Issue 16: GR1 has no built-in config; the error says what to do in flags, not in Python functions."""
    out = subprocess.run([sys.executable, "-m", "policyserve", "serve", "--port", "0", "--dataset-path",
                          str(gr1_dataset_path), "--embodiment-tag", "GR1"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.count("error: ") == 1
    line = out.stderr.strip().splitlines()[-1]
    assert "no modality config registered for embodiment 'gr1'" in line
    assert "leave --embodiment-tag out (the modality config is then inferred from the dataset)" in line
    assert "--modality-config-path FILE" in line and "register_modality_config" not in line


def test_bad_server_config_names_the_flag():
    out = subprocess.run([sys.executable, "-m", "policyserve", "serve", "--port", "0", "--max-batch-size", "0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == ["error: --max-batch-size must be >= 1, got 0"]
