"""The action-divergence rule against a trained model's own sampling noise (issue 16, item 8).

For each demo of a recorded HDF5 file, the model is asked for an action at every recorded observation (open
loop: the observations are the demo's, so both samples see exactly the same inputs) twice, under two base
seeds (each query gets fresh noise, :func:`policyserve.client.driver.query_seed`). The two samples differ by
sampling noise only; the rule (``eval.divergence``, default threshold and window) must not call that a
divergence. The same samples are also compared with the demo's recorded actions. Prints, per demo and action
key, the divergence step of noise vs noise and of model vs demo, under the rule and under the plain "first step
beyond the threshold" (window 1), and the largest noise difference.

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
    parser.add_argument("--seeds", type=int, nargs=2, default=[0, 1])
    args = parser.parse_args()
    demos = DemoFile(args.hdf5_path)
    server = ServerProcess(["--model-path", args.model_path, "--embodiment-tag", "franka_panda"],
                           name="model server", startup_timeout_s=120).start()
    try:
        client = connect_policy("127.0.0.1", server.port, timeout_ms=60000, role="model")
        dims = {k: int(v) for k, v in zip(client.get_modality_config()["action"].modality_keys, (6, 1))}
        print(f"model {args.model_path}, demos {args.demos} of {args.hdf5_path}; rule: threshold "
              f"{args.threshold}, window {args.window} (window 1: first step beyond the threshold); seeds "
              f"{args.seeds[0]} and {args.seeds[1]}, fresh noise per query")
        print(f"{'demo':>4} {'steps':>5}  {'key':<8} {'noise: rule':>11} {'window 1':>8} {'max |a-b|':>9}   "
              f"{'model vs demo: rule':>19} {'window 1':>8}")
        fired = 0
        for demo in args.demos:
            t0 = time.perf_counter()
            a, b = (sample_actions(client, demos, demo, s, dims) for s in args.seeds)
            recorded = demos.actions(demo)[:len(a)]
            noise = divergence_steps(a, b, dims, args.threshold, args.window)
            noise1 = divergence_steps(a, b, dims, args.threshold, 1)
            vs_demo = divergence_steps(a, recorded, dims, args.threshold, args.window)
            vs_demo1 = divergence_steps(a, recorded, dims, args.threshold, 1)
            spread = max_diff_per_key(a, b, dims)
            for key in dims:
                fired += noise[key] is not None
                print(f"{demo:>4} {len(a):>5}  {key:<8} {_step(noise[key]):>11} {_step(noise1[key]):>8} "
                      f"{spread[key]:>9.3f}   {_step(vs_demo[key]):>19} {_step(vs_demo1[key]):>8}")
            print(f"      ({time.perf_counter() - t0:.0f} s)")
        print(f"noise vs noise: the rule fired on {fired} of {len(args.demos) * len(dims)} (demo, key) pairs")
        client.close()
    finally:
        server.stop()


def _step(step: int | None) -> str:
    return "never" if step is None else str(step)


if __name__ == "__main__":
    main()
