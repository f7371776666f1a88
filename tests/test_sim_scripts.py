"""The sim package used from real scripts run in a subprocess: vector envs without a main guard, quiet logs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("robosuite")

pytestmark = pytest.mark.sim

SRC = str(Path(__file__).resolve().parents[1] / "src")

VECTOR_SCRIPT = """
from policyserve.sim import make_env, make_vec_env
{guard}
    env = make_env("lift", camera_size=(32, 32))  # an env with cameras: this process now holds a GL context
    env.reset(seed=0)
    vec = make_vec_env("lift", 2, camera_names=(), seed=0)
    obs, _ = vec.reset(seed=0)
    print("vector ok", obs["eef_pos"].shape)
    vec.close()
"""

BUILD_SCRIPT = """
from policyserve.sim import make_env
make_env("lift", camera_names=()).reset(seed=0)
print("built")
"""


def _run(script: str, tmp_path: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    path = tmp_path / "script.py"
    path.write_text(script)
    env = {k: v for k, v in os.environ.items() if k != "POLICYSERVE_SIM_VERBOSE"}
    env.update(PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]), **(extra_env or {}))
    return subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=240)


@pytest.mark.timeout(600)
def test_vector_env_in_a_script_without_main_guard(tmp_path: Path) -> None:
    unguarded = _run(VECTOR_SCRIPT.format(guard="if True:"), tmp_path)
    assert unguarded.returncode != 0
    last = unguarded.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: make_vec_env: worker processes ('forkserver' context) exited while starting")
    assert 'under `if __name__ == "__main__":`' in last and "script.py" in last
    assert "BrokenPipeError" not in last

    guarded = _run(VECTOR_SCRIPT.format(guard='if __name__ == "__main__":'), tmp_path)
    assert guarded.returncode == 0, guarded.stderr[-2000:]
    assert "vector ok (2, 3)" in guarded.stdout


@pytest.mark.timeout(300)
def test_robosuite_chatter_is_quiet_unless_verbose(tmp_path: Path) -> None:
    quiet = _run(BUILD_SCRIPT, tmp_path)
    assert quiet.returncode == 0 and "built" in quiet.stdout, quiet.stderr[-2000:]
    for text in ("macro file", "robosuite_models", "mink-based whole-body IK", "Loading controller"):
        assert text not in quiet.stdout + quiet.stderr

    verbose = _run(BUILD_SCRIPT, tmp_path, {"POLICYSERVE_SIM_VERBOSE": "1"})
    assert verbose.returncode == 0, verbose.stderr[-2000:]
    for text in ("robosuite_models", "mink-based whole-body IK", "Loading controller"):
        assert text in verbose.stderr

    by_call = _run("from policyserve.sim import set_verbose\nset_verbose(True)\n" + BUILD_SCRIPT, tmp_path)
    assert "Loading controller" in by_call.stderr


@pytest.mark.timeout(300)
def test_sim_commands_are_quiet_unless_verbose_flag(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "POLICYSERVE_SIM_VERBOSE"}
    argv = [sys.executable, "-m", "policyserve", "record", "--task", "lift", "--n-demos", "1", "--camera-size", "32",
            "--output", str(tmp_path / "demos.hdf5")]
    quiet = subprocess.run(argv, capture_output=True, text=True, timeout=240, env=env)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert "robosuite_models" not in quiet.stdout + quiet.stderr
    verbose = subprocess.run([*argv[:-1], str(tmp_path / "demos2.hdf5"), "--verbose"], capture_output=True,
                             text=True, timeout=240, env=env)
    assert verbose.returncode == 0, verbose.stderr[-2000:]
    assert "robosuite_models" in verbose.stderr and "Loading controller" in verbose.stderr
