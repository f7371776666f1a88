"""``policyserve demo``: record demos, convert, serve replay + model, compare and evaluate, in a few minutes.

Needs nothing running: every server is started here (on free local ports) and stopped at the end,
on errors and on Ctrl-C too. Prints where the comparison plot, videos and reports are.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from .common import parse_size


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="end-to-end demo: record, convert, serve, compare, evaluate",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("lift", "stack"), default="lift")
    p.add_argument("--output", default=None, help="output directory (default ./outputs/demo-<timestamp>)")
    p.add_argument("--n-demos", type=int, default=3, help="scripted demos to record (default 3)")
    p.add_argument("--camera-size", type=parse_size, default=(64, 64), help="camera size (default 64)")
    p.add_argument("--model-steps", type=int, default=50,
                   help="train a tiny model for N steps and serve it (default 50, about a minute on 2 cores); "
                        "0 serves the scripted expert as the model server instead")
    p.add_argument("--eval-episodes", type=int, default=4)
    p.add_argument("--eval-envs", type=int, default=2)
    p.add_argument("--max-episode-steps", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError, PolicyServeError
    from .demo_workflow import DemoConfig, print_result, run_demo

    minimum = {"n_demos": 1, "model_steps": 0, "eval_episodes": 1, "eval_envs": 1, "max_episode_steps": 1}
    for flag, least in minimum.items():
        if getattr(args, flag) < least:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least {least}, got {getattr(args, flag)}")
    config = DemoConfig(task=args.task, output=args.output, n_demos=args.n_demos, camera_size=args.camera_size,
                        model_steps=args.model_steps, eval_episodes=args.eval_episodes, eval_envs=args.eval_envs,
                        max_episode_steps=args.max_episode_steps, seed=args.seed, progress=not args.quiet)
    start = time.perf_counter()
    try:
        result = run_demo(config)
    except KeyboardInterrupt:
        print("\ninterrupted: every server started by the demo has been stopped", file=sys.stderr)
        return 130
    except (PolicyServeError, OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    print_result(result, time.perf_counter() - start)
    return 0
