"""Scaling out on Ray: distributed rollout throughput.

Rollout section (:func:`rollout_section`): env steps/s of ``rollout`` in one process, then with 1 and 2 Ray
worker actors (``--workers``, a local Ray instance started once for both), all against the same policy server
(the ``franka_panda`` constant policy served by ``policyserve serve`` in a subprocess; it never succeeds, so
every episode runs its full length and every run steps the same number of envs). Each worker owns ``--n-envs``
envs with two cameras. Prints env steps/s (from the first ready worker to the end; a single-process run's
wall time also excludes building its envs), the ratio to the single-process run, the worker startup time,
and peak memory (RSS) per worker process.

    python benchmarks/scale.py [--episodes 6] [--steps 60] [--camera-size 128] [--n-action-steps 8] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import os
import resource

os.environ.setdefault("MUJOCO_GL", "egl")


def rollout_section(task: str = "lift", episodes: int = 6, steps: int = 60, camera_size: int = 128,
                    n_action_steps: int = 8, n_envs: int = 1, workers: tuple[int, ...] = (1, 2)) -> None:
    """Print env steps/s of a single-process rollout and of distributed rollouts with each count of ``workers``."""
    from policyserve.cli.server_process import ServerProcess
    from policyserve.client.connect import connect_policy
    from policyserve.client.driver import DriverConfig
    from policyserve.eval.distributed import DistributedConfig, ServerAddress, run_distributed_rollout
    from policyserve.eval.envs import EnvConfig
    from policyserve.eval.rollout import RolloutConfig, run_rollout
    from policyserve.ray_runtime import ray_session

    config = RolloutConfig(env=EnvConfig(task=task, camera_size=(camera_size, camera_size)),
                           driver=DriverConfig(n_action_steps=n_action_steps), n_episodes=episodes, n_envs=n_envs,
                           max_episode_steps=steps, progress=False)
    print(f"rollout: task={task}, {episodes} episodes x {steps} steps, {n_envs} env(s) per process/worker, cameras "
          f"2x{camera_size}^2, n_action_steps={n_action_steps}, constant policy server in a subprocess; "
          f"{os.cpu_count()} CPU cores")
    print(f"{'run':>16} {'env steps':>9} {'wall s':>7} {'steps/s':>8} {'vs 1 proc':>9} {'startup s':>9} "
          f"{'peak RSS MiB per worker':>24}")
    with ServerProcess(["--embodiment-tag", "franka_panda"], name="constant server") as server:
        client = connect_policy(server.host, server.port)
        try:
            t = run_rollout(client, config).timing
        finally:
            client.close()
        base = t["env_steps_per_s"]
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"{'single process':>16} {t['env_steps']:>9} {t['wall_s']:>7.2f} {base:>8.1f} {1.0:>8.2f}x "
              f"{'-':>9} {f'{rss:.0f} (this process)':>24}")
        with ray_session(num_cpus=max(workers)):
            for k in workers:
                report = run_distributed_rollout(ServerAddress(server.host, server.port), config,
                                                 DistributedConfig(workers=k))
                t = report.timing
                assert [e.episode for e in report.episodes] == list(range(episodes))
                peaks = ", ".join(f"{m:.0f}" for m in t["worker_peak_rss_mb"])
                print(f"{f'{k} worker(s)':>16} {t['env_steps']:>9} {t['wall_s']:>7.2f} {t['env_steps_per_s']:>8.1f} "
                      f"{t['env_steps_per_s'] / base:>8.2f}x {t['startup_s']:>9.1f} {peaks:>24}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="lift")
    parser.add_argument("--episodes", type=int, default=6)
    parser.add_argument("--steps", type=int, default=60, help="env steps per episode (the constant policy never succeeds)")
    parser.add_argument("--camera-size", type=int, default=128)
    parser.add_argument("--n-action-steps", type=int, default=8)
    parser.add_argument("--n-envs", type=int, default=1, help="envs per process / per worker")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    rollout_section(args.task, args.episodes, args.steps, args.camera_size, args.n_action_steps, args.n_envs,
                    tuple(args.workers))


if __name__ == "__main__":
    main()
