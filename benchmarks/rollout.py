"""Rollout loop throughput: env steps/s through envs + adapter + client + server, n_action_steps 1 vs 8.

The policy is the built-in constant policy for ``franka_panda`` served by ``policyserve serve`` in a
subprocess (so the round trip includes msgpack encoding of both camera images and ZeroMQ transport).
Prints env steps/s, policy queries and the share of wall time spent in the policy round trip.

    python benchmarks/rollout.py [--n-envs 2] [--episodes 2] [--steps 64] [--camera-size 64]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("MUJOCO_GL", "egl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="lift")
    parser.add_argument("--n-envs", type=int, default=2)
    parser.add_argument("--episodes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=64, help="env steps per episode (constant policy never succeeds)")
    parser.add_argument("--camera-size", type=int, default=64)
    parser.add_argument("--action-steps", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()

    from policyserve.eval.rollout import RolloutConfig, make_envs, run_rollout
    from policyserve.eval.servers import ServerProcess, connect_policy

    with ServerProcess(["--embodiment-tag", "franka_panda"], name="constant server") as server:
        client = connect_policy(server.host, server.port)
        try:
            base = RolloutConfig(task=args.task, n_episodes=args.episodes, n_envs=args.n_envs,
                                 max_episode_steps=args.steps, camera_size=(args.camera_size, args.camera_size),
                                 progress=False)
            envs = make_envs(base, ["ego_view", "wrist_view"])
            try:
                run_rollout(client, RolloutConfig(**{**base.__dict__, "n_episodes": args.n_envs,
                                                     "max_episode_steps": 2}), envs=envs)  # warm-up
                print(f"task={args.task} n_envs={args.n_envs} episodes={args.episodes} steps/episode={args.steps} "
                      f"cameras=2x{args.camera_size}^2")
                print(f"{'n_action_steps':>14} {'env steps':>9} {'wall s':>7} {'steps/s':>8} {'queries':>7} "
                      f"{'policy ms/query':>15} {'policy share':>12}")
                for n in args.action_steps:
                    config = RolloutConfig(**{**base.__dict__, "n_action_steps": n})
                    t = run_rollout(client, config, envs=envs).timing
                    print(f"{n:>14} {t['env_steps']:>9} {t['wall_s']:>7.2f} {t['env_steps_per_s']:>8.1f} "
                          f"{t['policy_queries']:>7} {1000 * t['policy_time_s'] / max(1, t['policy_queries']):>15.2f} "
                          f"{100 * t['policy_share']:>11.1f}%")
            finally:
                for env in envs:
                    env.close()
        finally:
            client.close()


if __name__ == "__main__":
    main()
