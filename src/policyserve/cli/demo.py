"""``policyserve demo``: record demos, convert, serve replay + model, compare and evaluate, in a few minutes.

Needs nothing running: every server is started here (on free local ports) and stopped at the end,
on errors and on Ctrl-C too. Prints where the comparison plot, videos and reports are.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from .common import add_policy_seed, add_progress
from .flags import Flag, RawDescriptionHelpFormatter, add_config_flags, config_kwargs


def register(sub: Any) -> None:
    """Add the ``demo`` command; its flags come from :class:`~policyserve.cli.demo_workflow.DemoConfig`."""
    from .demo_workflow import DemoConfig

    p = sub.add_parser("demo", help="end-to-end demo: record, convert, serve, compare, evaluate",
                       description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    dests = add_config_flags(p, DemoConfig, ["task", "output", "n_demos", "camera_size", "model_steps",
                                             "eval_episodes", "eval_envs", "max_episode_steps", "seed"],
                             task=Flag(choices=("lift", "stack")))
    dests.update(add_progress(p, DemoConfig))
    add_policy_seed(p)
    p.set_defaults(func=lambda args: run(args, dests),
                   interrupted_note="every server started by the demo has been stopped")


def run(args: argparse.Namespace, dests: dict[str, str]) -> int:
    """Run the demo and print where its outputs are."""
    from .demo_workflow import DemoConfig, print_result, run_demo

    config = DemoConfig(**config_kwargs(args, dests), policy_seed=args.policy_seed)
    start = time.perf_counter()
    result = run_demo(config)
    print_result(result, time.perf_counter() - start)
    return 0
