"""Latency-robust execution on a trained checkpoint: the RTC paper's protocol (Black et al. 2025) on our tasks.

For each inference delay d (env steps, simulated time: a query at step t is answered at t + d on every
machine) and each execution mode (sync: hold still while waiting; async: keep executing, switch at t + d;
ensemble: async with temporal ensembling; rtc: async with real-time chunking), N episodes with identical
seeds in every cell. Prints success with its Wilson 95 % interval, mean steps to success, the executed
actions' jerk at chunk boundaries (J_B) and inside chunks (J_I), and the cost of an RTC request against a
plain one at B=1 and B=8. The policy runs in this process (the served path is the same policy call).

    python benchmarks/latency.py --model-path RUN [--task lift] [--n-episodes 50] [--delays 0 1 2 4 8] \
        [--modes sync async ensemble rtc] [--camera-size 84] [--seed 1000] [--processes 2 --threads 1] \
        [--json out.json]
    # and a Stack model: --stack-model-path RUN_STACK
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

os.environ.setdefault("MUJOCO_GL", "egl")


def cell(policy, envs, env_config, mode: str, delay: int, args: argparse.Namespace) -> dict:
    """One (mode, delay) cell: a rollout of ``args.n_episodes`` episodes seeded ``args.seed + k`` on ``envs``."""
    from policyserve.client.driver import DriverConfig
    from policyserve.eval.rollout import FRANKA_DELTA_DIMS, RolloutConfig, run_rollout

    config = RolloutConfig(
        env=env_config,
        driver=DriverConfig(n_action_steps=args.n_action_steps, execution=mode, inference_delay_steps=delay,
                            action_options={"seed": args.seed}, hold_zero_dims=FRANKA_DELTA_DIMS,
                            rtc_guidance=args.rtc_guidance, rtc_schedule=args.rtc_schedule),
        n_episodes=args.n_episodes, n_envs=args.n_envs, max_episode_steps=args.max_episode_steps, seed=args.seed,
        progress=False)
    start = time.perf_counter()
    report = run_rollout(policy, config, envs=envs)
    task = env_config.task
    lo, hi = report.ci95
    jerk = report.smoothness
    return {"task": task, "mode": mode, "delay": delay, "successes": report.successes, "n": report.n_episodes,
            "success_rate": report.success_rate, "ci95": [lo, hi],
            "mean_steps_to_success": report.mean_steps_to_success,
            **jerk.to_json(), "seconds": round(time.perf_counter() - start, 1)}


_WORKER: dict = {}
"""This process's policy, envs and settings (one process runs many cells on the same envs)."""


def worker_init(task: str, path: str, args: argparse.Namespace) -> None:
    """Load the checkpoint and build the envs once in this process."""
    import torch

    from policyserve.eval.envs import EnvConfig, make_envs
    from policyserve.model import load_policy
    from policyserve.sim.envs import FrankaEnvConfig

    torch.set_num_threads(args.threads)
    policy = load_policy(path, device="cpu")
    env_config = EnvConfig(task=task, sim=FrankaEnvConfig(camera_size=(args.camera_size, args.camera_size)))
    envs = make_envs(env_config, args.n_envs, video_keys=policy.get_modality_config()["video"].modality_keys,
                     max_episode_steps=args.max_episode_steps)  # built once: every cell runs the same envs
    _WORKER.update(policy=policy, envs=envs, env_config=env_config, args=args)


def worker_cell(delay_mode: tuple[int, str]) -> dict:
    """Run one (delay, mode) cell on this process's envs and print its line."""
    delay, mode = delay_mode
    row = cell(_WORKER["policy"], _WORKER["envs"], _WORKER["env_config"], mode, delay, _WORKER["args"])
    print(f"{row['task']} {mode} d={delay}: {row['successes']}/{row['n']} in {row['seconds']} s", flush=True)
    return row


def run_cells_in_processes(task: str, path: str, cells: list[tuple[int, str]], args: argparse.Namespace) -> list[dict]:
    """The cells' rows, in ``cells`` order, computed on ``args.processes`` worker processes (spawned: the envs
    hold GL contexts). Each cell is seeded on its own, so a row does not depend on which process ran it."""
    import multiprocessing

    # Longest first (sync waits longest, larger delays take more steps) so the processes finish together.
    order = sorted(range(len(cells)), key=lambda i: (-cells[i][0], cells[i][1] != "sync"))
    with multiprocessing.get_context("spawn").Pool(args.processes, initializer=worker_init,
                                                    initargs=(task, path, args)) as pool:
        results = pool.map(worker_cell, [cells[i] for i in order], chunksize=1)
    by_cell = dict(zip(order, results))
    return [by_cell[i] for i in range(len(cells))]


def fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def print_table(rows: list[dict]) -> None:
    print(f"{'task':<6}{'mode':<10}{'d':>3}{'success':>10}{'95% CI':>16}{'steps to success':>18}{'J_B':>9}{'J_I':>9}"
          f"{'J_B/J_I':>9}")
    for r in rows:
        ci = f"[{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]"
        print(f"{r['task']:<6}{r['mode']:<10}{r['delay']:>3}{r['successes']:>6}/{r['n']:<3}{ci:>16}"
              f"{fmt(r['mean_steps_to_success'], '.1f'):>18}{fmt(r['jerk_boundary']):>9}{fmt(r['jerk_inner']):>9}"
              f"{fmt(r['jerk_ratio'], '.2f'):>9}")


def main() -> None:
    from policyserve.client.driver import DriverConfig
    from policyserve.types import RTC_GUIDANCES, RTC_SCHEDULES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", required=True, help="a policyserve checkpoint trained on Lift")
    parser.add_argument("--stack-model-path", default=None, help="also run Stack with this checkpoint")
    parser.add_argument("--task", default="lift", choices=("lift", "stack"), help="the task of --model-path")
    parser.add_argument("--delays", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    parser.add_argument("--modes", nargs="+", default=["sync", "async", "ensemble", "rtc"],
                        choices=("sync", "async", "ensemble", "rtc"))
    parser.add_argument("--rtc-guidance", choices=RTC_GUIDANCES, default=DriverConfig.rtc_guidance,
                        help="rtc cells: how the server guides the chunk (default %(default)s)")
    parser.add_argument("--rtc-schedule", choices=RTC_SCHEDULES, default=DriverConfig.rtc_schedule,
                        help="rtc cells: the soft-mask schedule (default %(default)s)")
    parser.add_argument("--n-episodes", type=int, default=50)
    parser.add_argument("--n-envs", type=int, default=1,
                        help="envs stepped together (1: every episode on the same env, identical across cells)")
    parser.add_argument("--n-action-steps", type=int, default=8, help="execution horizon s")
    parser.add_argument("--max-episode-steps", type=int, default=200)
    parser.add_argument("--camera-size", type=int, default=84)
    parser.add_argument("--seed", type=int, default=1000, help="episode k is seeded seed + k; also the policy seed")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process")
    parser.add_argument("--processes", type=int, default=1,
                        help="run the cells on this many processes (each with its own envs; same rows)")
    parser.add_argument("--cost-reps", type=int, default=10, help="timed calls per RTC-cost measurement")
    parser.add_argument("--json", default=None, help="write the rows and the RTC cost here")
    args = parser.parse_args()

    import torch

    from model import rtc_cost  # benchmarks/model.py
    from policyserve.model import load_policy
    from policyserve.registry import get_embodiment_spec

    torch.set_num_threads(args.threads)
    runs = [(args.task, args.model_path)] + ([("stack", args.stack_model_path)] if args.stack_model_path else [])
    rows: list[dict] = []
    costs: dict[str, dict] = {}
    for task, path in runs:
        cells = [(delay, mode) for delay in args.delays for mode in args.modes]
        if args.processes > 1:
            rows += run_cells_in_processes(task, path, cells, args)
        else:
            worker_init(task, path, args)
            try:
                for delay, mode in cells:
                    rows.append(worker_cell((delay, mode)))
            finally:
                _WORKER["envs"].close()
        policy = _WORKER["policy"] if _WORKER else load_policy(path, device="cpu")  # loaded here once
        _WORKER.clear()
        image_size = policy.bundle.model_config.image_size
        for guidance in RTC_GUIDANCES:
            cost = rtc_cost(policy, image_size, get_embodiment_spec("franka_panda"), [1, 8], args.cost_reps, guidance)
            costs[f"{task} {guidance}"] = {**cost, "rtc_max_delay": policy.bundle.model_config.rtc_max_delay}
    print(f"\nexecution horizon s={args.n_action_steps}, {args.n_episodes} episodes per cell (seeds {args.seed}..."
          f"{args.seed + args.n_episodes - 1}), max {args.max_episode_steps} steps, torch threads {args.threads}, "
          f"rtc guidance {args.rtc_guidance} with the {args.rtc_schedule} schedule")
    print_table(rows)
    for name, cost in costs.items():
        task, guidance = name.split()
        how = (f"frozen steps conditioned up to d={cost['rtc_max_delay']} (training-time RTC)"
               if cost["rtc_max_delay"] else "inference-time RTC")
        print(f"RTC request cost ({task} model, {how}, {guidance} guidance, CPU): B=1 {cost['rtc_ms_B1']} ms vs plain "
              f"{cost['plain_ms_B1']} ms ({cost['rtc_cost_B1']}x); B=8 {cost['rtc_ms_B8']} ms vs {cost['plain_ms_B8']} ms "
              f"({cost['rtc_cost_B8']}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "rtc_cost": costs, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
