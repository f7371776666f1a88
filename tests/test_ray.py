"""The Ray tests, each file of cases in a fresh Python process of its own.

Ray keeps per-process state that outlives ``ray.shutdown()``: authentication settings, and Serve's handles and
metrics threads, which then touch objects of a session that is gone. In one process the cases of one file would
then depend on which Ray files ran before them; in a process each, they do not.

- ``ray_eval_cases.py``: distributed rollout and dataset-wide comparison on a real two-node cluster (loopback)
- ``ray_replicas_cases.py``: policy replicas on Ray Serve on a real two-node cluster, killed nodes and replicas
- ``ray_safety_cases.py``: loopback-only local instance, token auth, relative paths (issue 17)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray
HERE = Path(__file__).resolve().parent


@pytest.mark.timeout(3000)  # a whole file of cases, ~5 min idle and over 25 min beside two CPU burners (each case
# keeps the suite's own timeout in its process)
@pytest.mark.parametrize("cases", ["ray_eval_cases.py", "ray_replicas_cases.py", "ray_safety_cases.py"])
def test_ray_cases_in_a_fresh_process(cases):
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "-p", "no:warnings",
         str(HERE / cases)],
        cwd=HERE.parent, capture_output=True, text=True, timeout=2900)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, result.stdout[-2000:]
