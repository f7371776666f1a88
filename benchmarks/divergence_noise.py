"""The action-divergence rule against a trained model's own sampling noise (issue 16, item 8).

For each demo of a recorded HDF5 file, the model is asked for an action at every recorded observation (open
loop: the observations are the demo's, so every sample sees exactly the same inputs) under 2 + J base seeds
(each query gets fresh noise, :func:`policyserve.client.driver.query_seed`). Sample A plays the executed model
action, sample B plays a "demo" that differs from A by sampling noise only, and the J others are the noise
reference the comparison draws (``ComparisonConfig.noise_samples``). The rule (``eval.divergence``, default
threshold and window) must not call A vs B a divergence. Prints, per demo and action key, the divergence step of
A vs B under the rule with the noise reference, under the fixed-threshold rule (no reference) and under the plain
"first step beyond the threshold" (window 1), the largest |A - B|, A vs the demo's recorded actions under the
rule with the noise reference and without, and (to show that the rule still sees a real departure) A vs a made-up
departure from the demo: its recorded actions with the arm's translation and the gripper command reversed from
the middle step on (the arm heading elsewhere, the gripper doing the opposite); the rule should date it at or
soon after the middle step.

    python benchmarks/divergence_noise.py --model-path run/checkpoint-1000 --hdf5-path lift30.hdf5 [--demos 0 1 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from policyserve import DriverConfig, PolicyDriver
from policyserve.client.connect import connect_policy
from policyserve.data.demos import DemoFile
from policyserve.eval.divergence import ACTION_WINDOW, divergence_steps, max_diff_per_key
from policyserve.launch import ServerProcess


def sample_actions(client, demos: DemoFile, demo: int, base_seed: int, dims: dict[str, int]) -> np.ndarray:
    """The model's action at each recorded observation of ``demo`` (one query per step), under ``base_seed``."""
    driver = PolicyDriver(client, 1, DriverConfig(n_action_steps=1, action_options={"seed": base_seed}),
                          action_dim=sum(dims.values()))
    driver.reset(seeds=demo)
    text = demos.task_text or ""
    actions = []
    for t in range(demos.length(demo)):
        obs = {k: v[None] for k, v in demos.observation(demo, t).items()}
        actions.append(np.asarray(driver.act({**obs, "task": [text]}))[0])
    return np.stack(actions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--hdf5-path", required=True)
    parser.add_argument("--demos", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threshold", type=float, default=0.1)
    parser.add_argument("--window", type=int, default=ACTION_WINDOW)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3],
                        help="base seeds of A, B and the noise reference (at least two)")
    args = parser.parse_args()
    if len(args.seeds) < 2:
        parser.error("--seeds needs at least two seeds (A and B)")
    demos = DemoFile(args.hdf5_path)
    server = ServerProcess(["--model-path", args.model_path, "--embodiment-tag", "franka_panda"],
                           name="model server", startup_timeout_s=120).start()
    try:
        client = connect_policy("127.0.0.1", server.port, timeout_ms=60000, role="model")
        dims = {k: int(v) for k, v in zip(client.get_modality_config()["action"].modality_keys, (6, 1))}
        print(f"model {args.model_path}, demos {args.demos} of {args.hdf5_path}; rule: threshold "
              f"{args.threshold}, window {args.window}; A seed {args.seeds[0]}, B seed {args.seeds[1]}, noise "
              f"reference seeds {args.seeds[2:]} (J={len(args.seeds) - 2}); fresh noise per query")
        print(f"{'demo':>4} {'steps':>5}  {'key':<8} {'A vs B: rule':>12} {'fixed':>6} {'window 1':>8} "
              f"{'max |A-B|':>9}   {'A vs demo: rule':>15} {'fixed':>6}   {'A vs departure at T/2: rule':>27}")
        fired = fired_fixed = seen = 0
        for demo in args.demos:
            t0 = time.perf_counter()
            a, b, *others = (sample_actions(client, demos, demo, s, dims) for s in args.seeds)
            reference = np.stack(others, axis=1) if others else None
            recorded = demos.actions(demo)[:len(a)]
            noise = divergence_steps(a, b, dims, args.threshold, args.window, resamples=reference)
            fixed = divergence_steps(a, b, dims, args.threshold, args.window)
            noise1 = divergence_steps(a, b, dims, args.threshold, 1)
            vs_demo = divergence_steps(a, recorded, dims, args.threshold, args.window, resamples=reference)
            vs_demo_fixed = divergence_steps(a, recorded, dims, args.threshold, args.window)
            spread = max_diff_per_key(a, b, dims)
            departure = np.array(recorded, dtype=np.float64)
            departure[len(a) // 2:, [0, 1, 2, 6]] *= -1
            vs_other = divergence_steps(a, departure, dims, args.threshold, args.window, resamples=reference)
            seen += any(v is not None and v >= len(a) // 2 for v in vs_other.values())
            for key in dims:
                fired += noise[key] is not None
                fired_fixed += fixed[key] is not None
                print(f"{demo:>4} {len(a):>5}  {key:<8} {_step(noise[key]):>12} {_step(fixed[key]):>6} "
                      f"{_step(noise1[key]):>8} {spread[key]:>9.3f}   {_step(vs_demo[key]):>15} "
                      f"{_step(vs_demo_fixed[key]):>6}   {_step(vs_other[key]):>27}")
            print(f"      ({time.perf_counter() - t0:.0f} s)")
        pairs = len(args.demos) * len(dims)
        print(f"A vs B (noise only): the rule with the noise reference fired on {fired} of {pairs} (demo, key) "
              f"pairs, the fixed-threshold rule on {fired_fixed}; A vs the departure: the rule dated it at or after "
              f"T/2 on {seen} of {len(args.demos)} demos")
        client.close()
    finally:
        server.stop()


def _step(step: int | None) -> str:
    return "never" if step is None else str(step)


if __name__ == "__main__":
    main()
