"""``policyserve compare``: the model-vs-replay comparison rollout.

Two envs are restored to the recorded state of demo --demo-index at step --start-step of --hdf5-path;
env 0 follows the model server (--model-port), env 1 the replay server (--replay-port, reset to
episode_index=demo index, step_index=start step; any --execution-horizon: the replay reports it in its
replies). Swapped ports are an error. Writes comparison.json, traces.csv, comparison.png and comparison.mp4
under --output.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from .common import add_api_token
from .rollout import add_driver_arguments, add_env_arguments, driver_config_from_args, env_config_from_args, server_hint


def register(sub: Any) -> None:
    p = sub.add_parser("compare", help="model vs replay comparison rollout from a recorded demo state",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("lift", "stack"), default="stack")
    p.add_argument("--hdf5-path", required=True, help="recorded demos (policyserve record)")
    p.add_argument("--demo-index", type=int, default=0)
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
    add_env_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..client.connect import ServerUnavailableError, connect_policy
    from ..errors import PolicyServeError
    from ..eval.compare import ComparisonConfig, check_demo_range, run_comparison

    output = args.output or f"outputs/compare-{time.strftime('%Y%m%d-%H%M%S')}"
    clients = []
    port = args.model_port
    try:
        config = ComparisonConfig(
            env=env_config_from_args(args), driver=driver_config_from_args(args), hdf5_path=args.hdf5_path,
            demo_index=args.demo_index, start_step=args.start_step, max_steps=args.max_steps,
            eef_threshold=args.eef_threshold, action_threshold=args.action_threshold, output_dir=output,
            video=not args.no_video, progress=not args.quiet,
        )
        check_demo_range(args.hdf5_path, args.demo_index, args.start_step)
        for role, port in (("model", args.model_port), ("replay", args.replay_port)):
            clients.append(connect_policy(args.host, port, api_token=args.api_token, timeout_ms=args.timeout_ms,
                                          role=role))
        result = run_comparison(clients[0], clients[1], config)
    except ServerUnavailableError as exc:
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
