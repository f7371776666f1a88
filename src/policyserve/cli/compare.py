"""``policyserve compare``: the model-vs-replay comparison rollout.

Two envs are restored to the recorded state of demo --demo-index at step --start-step of --hdf5-path;
env 0 follows the model server (--model-port), env 1 the replay server (--replay-port, reset to
episode_index=demo index, step_index=start step; any --execution-horizon: the replay reports it in its
replies). Swapped ports are an error. Writes comparison.json, traces.csv, comparison.png and comparison.mp4
under --output.

--all-demos compares every demo of the HDF5 file (outputs per demo under --output/demo_N/) and writes the
aggregate report aggregate.json, aggregate.csv and the summary plot summary.png under --output; with
--workers K the demos are compared on K Ray worker actors, each with its own model and replay clients (the
replay server keeps one cursor per client, so one replay server serves every worker).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from .common import add_api_token, add_ray_arguments, distributed_config_from_args
from .rollout import add_driver_arguments, add_env_arguments, driver_config_from_args, env_config_from_args, server_hint


def register(sub: Any) -> None:
    p = sub.add_parser("compare", help="model vs replay comparison rollout from a recorded demo state",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("lift", "stack"), default="stack")
    p.add_argument("--hdf5-path", required=True, help="recorded demos (policyserve record)")
    p.add_argument("--demo-index", type=int, default=None, help="the demo to compare (default 0)")
    p.add_argument("--all-demos", action="store_true",
                   help="compare every demo of --hdf5-path and write the aggregate report and summary plot")
    p.add_argument("--start-step", type=int, default=0)
    p.add_argument("--host", default="127.0.0.1", help="host of both servers (default 127.0.0.1)")
    p.add_argument("--model-port", type=int, default=5555)
    p.add_argument("--replay-port", type=int, default=5556)
    add_api_token(p)
    p.add_argument("--max-steps", type=int, default=None, help="default: the rest of the demo")
    add_driver_arguments(p, default_steps=1, steps_help="model actions executed per model query (default 1)")
    p.add_argument("--eef-threshold", type=float, default=0.02, help="eef distance (m) that counts as diverged")
    p.add_argument("--action-threshold", type=float, default=0.1, help="action difference that counts as diverged")
    p.add_argument("--output", default=None, help="output directory (default ./outputs/compare-<timestamp>)")
    p.add_argument("--no-video", action="store_true", help="skip the side-by-side MP4")
    add_ray_arguments(p, "demo comparisons (with --all-demos)")
    add_env_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..client.connect import ServerUnavailableError, connect_policy
    from ..errors import ConfigError, PolicyServeError
    from ..eval.compare import ComparisonConfig, check_demo_range, run_comparison

    output = args.output or f"outputs/compare-{time.strftime('%Y%m%d-%H%M%S')}"
    clients = []
    port = args.model_port
    try:
        if args.all_demos and args.demo_index is not None:
            raise ConfigError("give either --demo-index or --all-demos, not both")
        config = ComparisonConfig(
            env=env_config_from_args(args), driver=driver_config_from_args(args), hdf5_path=args.hdf5_path,
            demo_index=args.demo_index or 0, start_step=args.start_step, max_steps=args.max_steps,
            eef_threshold=args.eef_threshold, action_threshold=args.action_threshold, output_dir=output,
            video=not args.no_video, progress=not args.quiet,
        )
        dist = distributed_config_from_args(args)
        if dist is not None and not args.all_demos:
            raise ConfigError("--workers runs the comparisons of --all-demos in parallel; add --all-demos")
        if dist is not None:
            from ..eval.distributed import ServerAddress, run_distributed_comparisons

            report = run_distributed_comparisons(
                *(ServerAddress(args.host, p, args.api_token, args.timeout_ms)
                  for p in (args.model_port, args.replay_port)), config, dist)
            print_aggregate(report)
            return 0
        if not args.all_demos:
            check_demo_range(args.hdf5_path, config.demo_index, args.start_step)
        for role, port in (("model", args.model_port), ("replay", args.replay_port)):
            clients.append(connect_policy(args.host, port, api_token=args.api_token, timeout_ms=args.timeout_ms,
                                          role=role))
        if args.all_demos:
            from ..eval.compare_all import run_all_comparisons

            print_aggregate(run_all_comparisons(clients[0], clients[1], config))
            return 0
        result = run_comparison(clients[0], clients[1], config)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        return 130
    except ServerUnavailableError as exc:
        port = args.replay_port if " replay server " in str(exc) else port
        print(f"error: {exc}; {server_hint(port)}", file=sys.stderr, flush=True)
        return 2
    except (PolicyServeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        for client in clients:
            client.close()
    print_comparison(result)
    return 0


def print_comparison(result: Any) -> None:
    """Human summary of a :class:`~policyserve.eval.compare.ComparisonResult`."""
    s = result.summary()
    div = "none" if s["divergence_step"] is None else s["divergence_step"]
    print(f"compared {s['steps']} steps: eef divergence step {div}, action divergence step "
          f"{'none' if s['action_divergence_step'] is None else s['action_divergence_step']}, max action diff "
          f"{s['max_action_diff']:.4f}, max eef distance {s['max_eef_distance']:.4f} m, success model "
          f"{s['success_model']} replay {s['success_replay']}")
    for kind, path in result.files.items():
        print(f"  {kind}: {path}")


def print_aggregate(report: Any) -> None:
    """Human summary of an :class:`~policyserve.eval.compare_all.AggregateComparison`."""
    print(report.summary_line())
    for kind, path in report.files.items():
        print(f"  {kind}: {path}")
