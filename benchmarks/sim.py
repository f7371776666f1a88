"""Env steps/s of the built-in Franka envs: 1 and 2 envs (sync/async), 224x224 cameras or none,
fast or robosuite-default render settings, and peak RSS.

    python benchmarks/sim.py [--steps 60] [--task lift] [--size 224]
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from dataclasses import dataclass

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np  # noqa: E402

from policyserve.sim import make_vec_env  # noqa: E402


@dataclass
class Case:
    n_envs: int
    async_: bool
    cameras: tuple[str, ...]
    render: str

    @property
    def label(self) -> str:
        cams = f"{len(self.cameras)} cams" if self.cameras else "no cams"
        return f"{self.n_envs} env {'async' if self.async_ else 'sync '} {cams:8s} {self.render:7s}"


def run_case(case: Case, task: str, size: int, steps: int) -> float:
    vec = make_vec_env(task, case.n_envs, async_=case.async_, seed=0, camera_names=case.cameras,
                       camera_size=(size, size), render_settings=case.render)
    try:
        vec.reset(seed=0)
        rng = np.random.default_rng(0)
        for _ in range(3):  # warm up
            vec.step(rng.uniform(-0.3, 0.3, (case.n_envs, 7)).astype(np.float32))
        start = time.perf_counter()
        for _ in range(steps):
            vec.step(rng.uniform(-0.3, 0.3, (case.n_envs, 7)).astype(np.float32))
        return steps * case.n_envs / (time.perf_counter() - start)
    finally:
        vec.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60, help="vector steps per case")
    parser.add_argument("--task", default="lift")
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    cams = ("table_cam", "wrist_cam")
    cases = [
        Case(1, False, (), "fast"),
        Case(1, False, cams, "fast"),
        Case(1, False, cams, "default"),
        Case(2, False, cams, "fast"),
        Case(2, True, cams, "fast"),
        Case(2, True, (), "fast"),
    ]
    print(f"task={args.task} cameras {args.size}x{args.size}, {args.steps} vector steps per case, {os.cpu_count()} CPUs")
    for case in cases:
        rate = run_case(case, args.task, args.size, args.steps * (4 if not case.cameras else 1))
        print(f"  {case.label}: {rate:7.1f} env-steps/s")
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"peak RSS: main process {own:.0f} MiB, largest worker {child:.0f} MiB")


if __name__ == "__main__":
    main()
