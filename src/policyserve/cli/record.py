"""``policyserve record``: record scripted-expert demos of a built-in task to robomimic-layout HDF5."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .flags import field_flags, parse_names, parse_size


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``record`` command (flags for :func:`policyserve.sim.recorder.record_demos`'s parameters)."""
    parser = subparsers.add_parser(
        "record",
        help="record scripted demos of a built-in Franka task to HDF5",
        description="Roll the scripted expert in the built-in Franka lift/stack env and write robomimic-layout "
        "HDF5 (data/demo_N/{actions, states, obs/<key>}).",
    )
    parser.add_argument("--task", choices=("lift", "stack"), default="lift", help="built-in Franka task (default lift)")
    parser.add_argument("--n-demos", type=int, default=50, help="number of demos to keep")
    parser.add_argument("--output", required=True, help="output .hdf5 path")
    parser.add_argument("--camera-size", type=parse_size, default=(128, 128), help="e.g. 128 or 128x128 (HxW)")
    parser.add_argument("--cameras", type=parse_names, default=("table_cam", "wrist_cam"),
                        help="comma-separated subset of table_cam,wrist_cam, or 'none'")
    parser.add_argument("--seed", type=int, default=0, help="episode k resets with seed + k")
    parser.add_argument("--keep-failed", action="store_true", help="also keep episodes that did not succeed")
    parser.add_argument("--max-episode-steps", type=int, default=None, metavar="N",
                        help="steps after which an episode ends (default: the task's own limit)")
    parser.add_argument("--render-settings", choices=("fast", "default"), default="fast",
                        help="renderer quality: fast (default) or robosuite's default")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
    # record_demos's parameters, for its errors
    field_flags(parser).update({name: f"--{name.replace('_', '-')}" for name in
                                ("n_demos", "camera_size", "max_episode_steps", "keep_failed", "render_settings")})
    field_flags(parser)["camera_names"] = "--cameras"


def run(args: argparse.Namespace) -> int:
    """Record the demos; prints the recorder's JSON summary (exit 1 when fewer demos than asked succeeded)."""
    from ..errors import ConfigError
    from ..sim.recorder import record_demos

    if args.n_demos < 1:
        raise ConfigError(f"--n-demos must be at least 1, got {args.n_demos}")
    if Path(args.output).is_dir():
        raise ConfigError(f"--output {args.output} is a directory; give the path of the .hdf5 file to write")

    summary = record_demos(
        args.task, args.n_demos, args.output, camera_names=args.cameras, camera_size=args.camera_size,
        seed=args.seed, keep_failed=args.keep_failed, max_episode_steps=args.max_episode_steps,
        progress=not args.no_progress, render_settings=args.render_settings,
    )
    print(json.dumps(summary))
    return 0 if summary["demos"] == args.n_demos else 1
