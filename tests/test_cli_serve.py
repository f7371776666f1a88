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
            with pytest.raises(UnauthorizedError):
                anonymous.ping()
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
