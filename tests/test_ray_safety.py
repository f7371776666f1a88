"""Ray, safely (issue 17): the cases in ``ray_safety_cases.py`` run in a fresh Python process, because Ray keeps
per-process authentication and configuration state that the suite's earlier Ray tests change."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray


def test_ray_safety_cases_in_a_fresh_process():
    here = Path(__file__).resolve().parent
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here / "ray_safety_cases.py")],
        cwd=here.parent, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout.splitlines()[-1], result.stdout[-2000:]
