"""``policyserve rollout``: evaluate a policy server (or a local scripted policy) in the Franka envs.

Counts exactly --n-episodes episodes (episode k seeded --seed + k, whichever env runs it), executes
--n-action-steps of each returned chunk, and prints per-episode results, the success rate with a
Wilson 95% interval and the mean return; --report writes them as JSON, --video-dir as MP4s. The policy is
seeded with --seed unless --policy-seed says otherwise (none: unseeded), so the same command gives the same
per-episode results. With --hdf5-path, episode k starts from demo --demo-indices[k] (a replay server is
reset to that demo and checked to serve the dataset converted from the file), and the task and camera size
come from the file's env_args.
With --workers K the episodes run on K Ray worker actors (each with --n-envs envs, reaching the policy server
at --host/--port over the network); results, videos and the report land here, as without workers.
"""

from __future__ import annotations

import argparse
from typing import Any

from .common import (EvalFlags, add_api_token, add_progress, add_ray_arguments, distributed_config_from_args,
                     unavailable_server_hint)
from .flags import Flag, RawDescriptionHelpFormatter, add_config_flags, config_kwargs


def register(sub: Any) -> None:
    """Add the ``rollout`` command; its flags come from RolloutConfig and the shared evaluation flags."""
    from ..eval.rollout import RolloutConfig

    defaults = RolloutConfig()
    p = sub.add_parser("rollout", help="evaluate a policy in simulation (success rate, videos, JSON report)",
                       description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="policy server host (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=5555, help="policy server port (default 5555)")
    add_api_token(p)
    p.add_argument("--policy", default=None, choices=("scripted",),
                   help="run a local policy instead of connecting to a server")
    flags = EvalFlags(p, defaults.env, defaults.driver)
    dests = add_config_flags(
        p, defaults, ["n_envs", "n_episodes", "max_episode_steps", "seed", "video_dir", "max_videos", "hdf5_path",
                      "demo_indices"],
        n_envs=Flag(help="envs stepped together in this process (one batched policy query)"),
        n_episodes=Flag(help="episodes counted, whichever env runs them"),
        max_episode_steps=Flag(help="steps after which an episode ends as a failure"),
        seed=Flag(help="episode k resets with seed + k"),
        video_dir=Flag(help="write one MP4 per episode here"),
        max_videos=Flag(help="only the first N episodes get a video", metavar="N"),
        hdf5_path=Flag(help="start episodes from recorded demo states (replay servers)"),
    )
    p.add_argument("--report", default=None, metavar="PATH", help="write the JSON report here")
    dests.update(add_progress(p, defaults))
    ray = add_ray_arguments(p, "episodes")
    p.set_defaults(func=lambda args: run(args, flags, dests, ray),
                   error_hint=unavailable_server_hint(lambda exc, args: args.port))


def run(args: argparse.Namespace, flags: EvalFlags, dests: dict[str, str], ray: dict[str, str]) -> int:
    """Run the evaluation the flags describe and print its summary."""
    from ..client.connect import connect_policy
    from ..errors import ConfigError
    from ..eval.rollout import RolloutConfig, run_rollout

    client = None
    try:
        values = config_kwargs(args, dests)
        config = RolloutConfig(env=flags.env_config(args, values["hdf5_path"]),
                               driver=flags.driver_config(args, values["seed"]), **values)
        dist = distributed_config_from_args(args, ray)
        if dist is not None:
            if args.policy:
                raise ConfigError("--workers runs the episodes against a policy server (--host/--port); "
                                  "--policy scripted runs in this process only")
            from ..eval.distributed import ServerAddress, run_distributed_rollout

            report = run_distributed_rollout(
                ServerAddress(args.host, args.port, args.api_token, args.timeout_ms), config, dist,
                report_path=args.report)
        elif args.policy == "scripted":
            from ..sim.scripted import make_scripted_policy

            report = run_rollout(make_scripted_policy(config.env.task), config, report_path=args.report)
        else:
            client = connect_policy(args.host, args.port, api_token=args.api_token, timeout_ms=args.timeout_ms)
            report = run_rollout(client, config, report_path=args.report)
    finally:
        if client is not None:
            client.close()
    print(report.summary())
    t = report.timing
    print(f"{t['env_steps']} env steps in {t['wall_s']:.1f} s ({t['env_steps_per_s']:.1f} steps/s), "
          f"{t['policy_queries']} policy queries ({100 * t['policy_share']:.1f}% of the time, the env loop waited "
          f"{100 * t['policy_wait_share']:.1f}%)")
    if args.report:
        print(f"report: {args.report}")
    if args.video_dir:
        print(f"videos: {args.video_dir}")
    if "workers" in t:
        print(f"{t['workers']} workers on {t['worker_nodes']} node(s), peak memory per worker (MiB): "
              f"{t['worker_peak_rss_mb']}; {t['worker_failures']} worker failure(s), re-run episodes: "
              f"{t['requeued'] or 'none'}")
    return 0
