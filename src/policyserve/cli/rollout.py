"""``policyserve rollout``: evaluate a policy server (or a local scripted policy) in the Franka envs.

Counts exactly --n-episodes episodes (episode k seeded --seed + k, whichever env runs it), executes
--n-action-steps of each returned chunk, and prints per-episode results, the success rate with a
Wilson 95% interval and the mean return; --report writes them as JSON, --video-dir as MP4s.
With --workers K the episodes run on K Ray worker actors (each with --n-envs envs, reaching the policy server
at --host/--port over the network); results, videos and the report land here, as without workers.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .common import add_api_token, add_ray_arguments, distributed_config_from_args, parse_size


def add_env_arguments(p: argparse.ArgumentParser, *, default_size: str = "128") -> None:
    """Env and key-map flags shared by rollout and compare."""
    p.add_argument("--camera-size", type=parse_size, default=parse_size(default_size),
                   help=f"camera image size, SIZE or HxW (default {default_size})")
    p.add_argument("--key-map", default=None, metavar="FILE",
                   help="JSON key map {video: {policy_key: env_key}, state: {...}, language: env_key}")
    p.add_argument("--map", action="append", default=[], metavar="M.POLICY=ENV",
                   help="override one key mapping, e.g. video.ego_view=table_cam (repeatable)")
    p.add_argument("--timeout-ms", type=int, default=15000, help="policy request timeout (default 15000)")
    p.add_argument("--policy-seed", type=int, default=None,
                   help="send options={'seed': S} with every get_action (deterministic model servers)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_driver_arguments(p: argparse.ArgumentParser, *, default_steps: int, steps_help: str) -> None:
    """How the policy's action chunks are executed (PolicyDriver flags) for rollout and compare."""
    p.add_argument("--n-action-steps", type=int, default=default_steps, help=steps_help)
    p.add_argument("--ensemble-coef", type=float, default=None,
                   help="temporal ensembling of overlapping chunks with weights exp(-coef*i)")
    p.add_argument("--async-inference", action="store_true",
                   help="ask for the next chunk while the current one executes (the env loop does not wait)")
    p.add_argument("--async-threshold", type=int, default=None,
                   help="with --async-inference: query when at most N actions of the window are left "
                        "(default n-action-steps // 2)")


def key_map_from_args(args: argparse.Namespace) -> Any:
    from ..client.adapter import KeyMap

    base = KeyMap.from_file(args.key_map) if args.key_map else KeyMap()
    return KeyMap.from_pairs(args.map, base)


def env_config_from_args(args: argparse.Namespace) -> Any:
    from ..eval.envs import EnvConfig

    return EnvConfig(task=args.task, camera_size=args.camera_size)


def driver_config_from_args(args: argparse.Namespace) -> Any:
    from ..client.driver import DriverConfig

    return DriverConfig(
        n_action_steps=args.n_action_steps, ensemble_coef=args.ensemble_coef, key_map=key_map_from_args(args),
        action_options=None if args.policy_seed is None else {"seed": args.policy_seed},
        async_inference=args.async_inference, async_threshold=args.async_threshold,
    )


def server_hint(port: int) -> str:
    """What to try when no server answers (the CLI's addition to the library's error)."""
    return f"start one with 'policyserve serve --port {port} ...' or check --host/--port/--api-token"


def register(sub: Any) -> None:
    p = sub.add_parser("rollout", help="evaluate a policy in simulation (success rate, videos, JSON report)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("lift", "stack"), default="lift")
    p.add_argument("--host", default="127.0.0.1", help="policy server host (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=5555, help="policy server port (default 5555)")
    add_api_token(p)
    p.add_argument("--policy", default=None, choices=("scripted",),
                   help="run a local policy instead of connecting to a server")
    p.add_argument("--n-envs", type=int, default=1)
    p.add_argument("--n-episodes", type=int, default=10)
    add_driver_arguments(p, default_steps=8, steps_help="actions executed per query (receding horizon)")
    p.add_argument("--max-episode-steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--video-dir", default=None, help="write one MP4 per episode here")
    p.add_argument("--max-videos", type=int, default=None, help="only the first N episodes get a video")
    p.add_argument("--report", default=None, metavar="PATH", help="write the JSON report here")
    p.add_argument("--hdf5-path", default=None, help="start episodes from recorded demo states (replay servers)")
    p.add_argument("--demo-indices", type=int, nargs="+", default=None,
                   help="with --hdf5-path: episode k starts from demo demo_indices[k %% len] (default 0)")
    add_ray_arguments(p, "episodes")
    add_env_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..client.connect import ServerUnavailableError, connect_policy
    from ..errors import ConfigError, PolicyServeError
    from ..eval.rollout import RolloutConfig, run_rollout

    client = None
    try:
        config = RolloutConfig(
            env=env_config_from_args(args), driver=driver_config_from_args(args), n_episodes=args.n_episodes,
            n_envs=args.n_envs, max_episode_steps=args.max_episode_steps, seed=args.seed, hdf5_path=args.hdf5_path,
            demo_indices=args.demo_indices, video_dir=args.video_dir, max_videos=args.max_videos,
            progress=not args.quiet,
        )
        dist = distributed_config_from_args(args)
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

            report = run_rollout(make_scripted_policy(args.task), config, report_path=args.report)
        else:
            client = connect_policy(args.host, args.port, api_token=args.api_token, timeout_ms=args.timeout_ms)
            report = run_rollout(client, config, report_path=args.report)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        return 130
    except ServerUnavailableError as exc:
        print(f"error: {exc}; {server_hint(args.port)}", file=sys.stderr, flush=True)
        return 2
    except (PolicyServeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
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
