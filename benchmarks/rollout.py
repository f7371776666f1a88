"""Rollout loop throughput: env steps/s through envs + PolicyDriver + client + server.

1. The built-in constant policy for ``franka_panda`` served by ``policyserve serve`` in a subprocess (the round
   trip includes msgpack encoding of both camera images and ZeroMQ transport), n_action_steps 1 vs 8.
2. The same policy answering ``--latency-ms`` later (default 100 ms, a server in a child process), with
   n_action_steps 8: sync driver vs async inference. Prints env steps/s, the ratio async/sync, the time the
   env loop waited for the policy, and the success flag of every episode (the constant policy never
   succeeds: the point is throughput; success under async is checked by tests/test_client_driver.py).

    python benchmarks/rollout.py [--n-envs 2] [--episodes 2] [--steps 64] [--camera-size 64] [--latency-ms 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time

os.environ.setdefault("MUJOCO_GL", "egl")


def serve_slow(port_queue: multiprocessing.Queue, latency_s: float) -> None:
    """Child process: the franka_panda constant policy, answering ``latency_s`` late, on a free port."""
    from policyserve.policies.base import PolicyWrapper
    from policyserve.policies.constant import ConstantPolicy
    from policyserve.serving.server import PolicyServer
    from policyserve.registry import get_embodiment_spec

    class Slow(PolicyWrapper):
        def _get_action(self, observation, options=None):
            time.sleep(latency_s)
            return self.policy.get_action(observation, options)

    spec = get_embodiment_spec("franka_panda")
    server = PolicyServer(Slow(ConstantPolicy(spec.modality_configs, spec.dims), strict=False), port=0, verbose=False)
    port_queue.put(server.bind())
    server.run()


def header() -> str:
    return (f"{'mode':>6} {'n_action_steps':>14} {'env steps':>9} {'wall s':>7} {'steps/s':>8} {'queries':>7} "
            f"{'policy ms/query':>15} {'policy share':>12} {'loop waited':>11}")


def row(mode: str, n: int, t: dict) -> str:
    return (f"{mode:>6} {n:>14} {t['env_steps']:>9} {t['wall_s']:>7.2f} {t['env_steps_per_s']:>8.1f} "
            f"{t['policy_queries']:>7} {1000 * t['policy_time_s'] / max(1, t['policy_queries']):>15.2f} "
            f"{100 * t['policy_share']:>11.1f}% {100 * t['policy_wait_share']:>10.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="lift")
    parser.add_argument("--n-envs", type=int, default=2)
    parser.add_argument("--episodes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=64, help="env steps per episode (constant policy never succeeds)")
    parser.add_argument("--camera-size", type=int, default=64)
    parser.add_argument("--action-steps", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--latency-ms", type=float, default=100.0, help="policy latency of the sync/async part")
    parser.add_argument("--repeats", type=int, default=3, help="sync/async runs each (medians are compared)")
    args = parser.parse_args()

    from dataclasses import replace

    from policyserve.launch import ServerProcess
    from policyserve.client.connect import connect_policy
    from policyserve.client.driver import DriverConfig
    from policyserve.eval.envs import EnvConfig, make_envs
    from policyserve.sim.envs import FrankaEnvConfig
    from policyserve.eval.rollout import RolloutConfig, run_rollout

    size = (args.camera_size, args.camera_size)
    base = RolloutConfig(env=EnvConfig(task=args.task, sim=FrankaEnvConfig(camera_size=size)),
                         n_episodes=args.episodes, n_envs=args.n_envs, max_episode_steps=args.steps, progress=False)
    envs = make_envs(base.env, args.n_envs, video_keys=["ego_view", "wrist_view"])
    print(f"task={args.task} n_envs={args.n_envs} episodes={args.episodes} steps/episode={args.steps} "
          f"cameras=2x{args.camera_size}^2")
    try:
        with ServerProcess(["--embodiment-tag", "franka_panda"], name="constant server") as server:
            client = connect_policy(server.host, server.port)
            try:
                run_rollout(client, replace(base, n_episodes=args.n_envs, max_episode_steps=2), envs=envs)  # warm-up
                print("\nconstant policy server (no added latency)")
                print(header())
                for n in args.action_steps:
                    t = run_rollout(client, replace(base, driver=DriverConfig(n_action_steps=n)), envs=envs).timing
                    print(row("sync", n, t))
            finally:
                client.close()

        queue: multiprocessing.Queue = multiprocessing.get_context("spawn").Queue()
        proc = multiprocessing.get_context("spawn").Process(target=serve_slow, args=(queue, args.latency_ms / 1000),
                                                            daemon=True)
        proc.start()
        try:
            client = connect_policy("127.0.0.1", queue.get(timeout=60), timeout_ms=30000)
            try:
                print(f"\nconstant policy answering {args.latency_ms:.0f} ms late ({args.repeats} alternating runs each)")
                print(header())
                rates: dict[str, list[float]] = {"sync": [], "async": []}
                for _ in range(args.repeats):
                    for mode in ("sync", "async"):
                        driver = DriverConfig(n_action_steps=8, async_inference=mode == "async")
                        report = run_rollout(client, replace(base, driver=driver), envs=envs)
                        rates[mode].append(report.timing["env_steps_per_s"])
                        print(row(mode, 8, report.timing) + f"  success {[e.success for e in report.episodes]}")
                sync, asyn = statistics.median(rates["sync"]), statistics.median(rates["async"])
                print(f"median env steps/s: sync {sync:.1f}, async {asyn:.1f}; async / sync {asyn / sync:.2f}x")
            finally:
                client.close()
        finally:
            proc.terminate()
            proc.join(10)
    finally:
        envs.close()


if __name__ == "__main__":
    main()
