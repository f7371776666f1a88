"""Shared test setup: headless rendering and paths to the shipped test data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO_ROOT.parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def gr1_dataset_path() -> Path:
    path = SHARED_DATASETS / "gr1.PickNPlace"
    if not path.is_dir():
        pytest.skip(f"shared dataset not found at {path}")
    return path


@pytest.fixture
def serve():
    """``serve(policy) -> Served``: policies served on loopback for the test, all stopped afterwards."""
    from helpers import Served

    served = []

    def _serve(policy):
        served.append(Served(policy))
        return served[-1]

    yield _serve
    for s in served:
        s.close()


SKIP_IS_FAILURE = ("skipped tests count as failures: a missing dependency or fixture must not pass as "
                   "'skipped' (install everything with scripts/install.sh; test data lives in ../shared/datasets)")


def _fail_skip(report) -> None:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"{SKIP_IS_FAILURE}\n{reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.skipped and not hasattr(report, "wasxfail"):
        _fail_skip(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    report = (yield).get_result()
    if report.outcome == "skipped":
        _fail_skip(report)
