"""Step time of the state-exact observation sampling against robosuite's own, in one process.

Builds the same Lift env twice, once with ``robosuite.make`` (observables sampled on timers inside the
step) and once with ``policyserve.sim.robosuite_env.make`` (sampled once from the final state), steps
them alternately with the same actions and prints the median step times and their ratio.

    python benchmarks/sim_observe.py [--steps 150] [--size 224]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np  # noqa: E402

import policyserve.sim  # noqa: E402, F401  (quiets robosuite before it is imported)
from policyserve.sim import robosuite_env  # noqa: E402
from policyserve.sim.render import FAST, apply_render_settings  # noqa: E402


def build(make: Callable[..., Any], cameras: list[str], size: int) -> Any:
    env = make("Lift", robots="Panda", has_renderer=False, has_offscreen_renderer=bool(cameras),
               use_camera_obs=bool(cameras), camera_names=cameras or "agentview", camera_heights=size,
               camera_widths=size, control_freq=20, horizon=10**6, ignore_done=True, hard_reset=False,
               reward_shaping=False, seed=0)
    env.reset()
    apply_render_settings(env, FAST)
    return env


def main() -> None:
    import robosuite

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=150, help="steps per env without cameras (1/5 with)")
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    for cameras in ([], ["agentview", "robot0_eye_in_hand"]):
        envs = {"robosuite": build(robosuite.make, cameras, args.size),
                "state-exact": build(robosuite_env.make, cameras, args.size)}
        times: dict[str, list[float]] = {name: [] for name in envs}
        rng = np.random.default_rng(0)
        for i in range(args.steps if not cameras else max(args.steps // 5, 5)):
            action = rng.uniform(-0.3, 0.3, 7)
            for name in sorted(envs, reverse=bool(i % 2)):  # alternate who goes first
                start = time.perf_counter()
                envs[name].step(action)
                times[name].append(time.perf_counter() - start)
        base, exact = (float(np.median(times[n])) * 1e3 for n in ("robosuite", "state-exact"))
        label = f"{len(cameras)} cams {args.size}x{args.size}" if cameras else "no cams"
        print(f"{label:16s}: median step robosuite {base:7.2f} ms, state-exact {exact:7.2f} ms, "
              f"ratio {exact / base:.3f}")
        for env in envs.values():
            env.close()


if __name__ == "__main__":
    main()
