"""``policyserve compare``: the model-vs-replay comparison rollout.

Two envs are restored to the recorded state of demo --demo-index at step --start-step of --hdf5-path;
env 0 follows the model server (--model-port), env 1 the replay server (--replay-port, reset to
demo_index=demo index, step_index=start step; any --execution-horizon: the replay reports it in its
replies). Swapped ports are an error, and so is a replay server that does not serve the dataset converted
from --hdf5-path (another file, demo, length or first action). The task and camera size come from the HDF5
file's env_args (a conflicting --task or --camera-size is an error). The model is seeded with --seed unless
--policy-seed says otherwise (none: unseeded). The action divergence is judged against the model's own
sampling noise: each model query also draws --noise-samples more samples (not executed). Writes comparison.json, traces.csv, comparison.png and
comparison.mp4 under --output.

--all-demos compares every demo of the HDF5 file (outputs per demo under --output/demo_N/) and writes the
aggregate report aggregate.json, aggregate.csv and the summary plot summary.png under --output; with
--workers K the demos are compared on K Ray worker actors, each with its own model and replay clients (the
replay server keeps one cursor per client, so one replay server serves every worker).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from .common import (EvalFlags, add_api_token, add_progress, add_ray_arguments, distributed_config_from_args,
                     unavailable_server_hint)
from .flags import Flag, RawDescriptionHelpFormatter, add_config_flags, config_kwargs


def register(sub: Any) -> None:
    """Add the ``compare`` command; its flags come from ComparisonConfig and the shared evaluation flags."""
    from ..eval.compare import ComparisonConfig

    defaults = ComparisonConfig()
    p = sub.add_parser("compare", help="model vs replay comparison rollout from a recorded demo state",
                       description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    dests = add_config_flags(
        p, defaults, ["hdf5_path", "demo_index", "start_step", "max_steps", "eef_threshold", "action_threshold",
                      "action_window", "noise_samples", "output_dir", "video"],
        hdf5_path=Flag(required=True, help="recorded demos (policyserve record)"),
        demo_index=Flag(default=None, help="the demo to compare (default 0)"),
        start_step=Flag(help="the demo step both envs start from"),
        output_dir=Flag(name="output", help="output directory (default ./outputs/compare-<timestamp>)"),
        video=Flag(help="write the side-by-side MP4"),
    )
    p.add_argument("--all-demos", action="store_true",
                   help="compare every demo of --hdf5-path and write the aggregate report and summary plot")
    p.add_argument("--host", default="127.0.0.1", help="host of both servers (default 127.0.0.1)")
    p.add_argument("--model-port", type=int, default=5555, help="the model server's port (default 5555)")
    p.add_argument("--replay-port", type=int, default=5556, help="the replay server's port (default 5556)")
    p.add_argument("--seed", type=int, default=0,
                   help="the comparison's seed: the model policy gets it as its seed unless --policy-seed (default 0)")
    add_api_token(p)
    from ..eval.envs import EnvConfig

    flags = EvalFlags(p, defaults.env or EnvConfig(), defaults.driver)
    dests.update(add_progress(p, defaults))
    ray = add_ray_arguments(p, "demo comparisons (with --all-demos)")
    p.set_defaults(func=lambda args: run(args, flags, dests, ray), error_hint=unavailable_server_hint(
        lambda exc, args: args.replay_port if " replay server " in str(exc) else args.model_port))


def run(args: argparse.Namespace, flags: EvalFlags, dests: dict[str, str], ray: dict[str, str]) -> int:
    """Run the comparison (or every demo's, with --all-demos) and print its summary."""
    from ..client.connect import connect_policy
    from ..errors import ConfigError
    from ..data.demos import DemoFile
    from ..eval.compare import ComparisonConfig, run_comparison

    values = config_kwargs(args, dests)
    if args.all_demos and values["demo_index"] is not None:
        raise ConfigError("give either --demo-index or --all-demos, not both")
    values["demo_index"] = values["demo_index"] or 0
    values["output_dir"] = values["output_dir"] or f"outputs/compare-{time.strftime('%Y%m%d-%H%M%S')}"
    demos = DemoFile(values["hdf5_path"])
    config = ComparisonConfig(env=flags.env_config(args, values["hdf5_path"]),
                              driver=flags.driver_config(args, args.seed), **values)
    dist = distributed_config_from_args(args, ray)
    if dist is not None and not args.all_demos:
        raise ConfigError("--workers runs the comparisons of --all-demos in parallel; add --all-demos")
    if dist is not None:
        from ..eval.distributed import ServerAddress, run_distributed_comparisons

        report = run_distributed_comparisons(
            *(ServerAddress(args.host, p, args.api_token, args.timeout_ms) for p in (args.model_port, args.replay_port)),
            config, dist)
        print_aggregate(report)
        return 0
    if not args.all_demos:
        demos.check_step(config.demo_index, config.start_step)
    clients = []
    try:
        for role, port in (("model", args.model_port), ("replay", args.replay_port)):
            clients.append(connect_policy(args.host, port, api_token=args.api_token, timeout_ms=args.timeout_ms,
                                          role=role))
        if args.all_demos:
            from ..eval.compare_all import run_all_comparisons

            print_aggregate(run_all_comparisons(clients[0], clients[1], config))
            return 0
        result = run_comparison(clients[0], clients[1], config)
    finally:
        for client in clients:
            client.close()
    print_comparison(result)
    return 0


def print_comparison(result: Any) -> None:
    """Human summary of a :class:`~policyserve.eval.compare.ComparisonResult`."""
    s = result.summary()
    div = "none" if s["divergence_step"] is None else s["divergence_step"]
    steps = ", ".join(f"{k} {'none' if v is None else v}" for k, v in s["action_divergence_per_key"].items())
    diffs = ", ".join(f"{k} {v:.4f}" for k, v in s["max_action_diff_per_key"].items())
    print(f"compared {s['steps']} steps: eef divergence step {div}, max eef distance {s['max_eef_distance']:.4f} m; "
          f"action divergence step {steps or 'none'}; max action diff {diffs or 'none'}; success model "
          f"{s['success_model']} replay {s['success_replay']}; policy seed {s['policy_seed']}")
    for kind, path in result.files.items():
        print(f"  {kind}: {path}")


def print_aggregate(report: Any) -> None:
    """Human summary of an :class:`~policyserve.eval.compare_all.AggregateComparison`."""
    print(report.summary_line())
    for kind, path in report.files.items():
        print(f"  {kind}: {path}")
