"""``policyserve convert hdf5-to-lerobot``: robomimic / IsaacLab-Mimic HDF5 demos -> GR00T LeRobot dataset."""

from __future__ import annotations

import argparse
from typing import Any

from ..data.lerobot_writer import FORMATS, V21
from .flags import field_flags


def register(subparsers: Any) -> None:
    """Add the ``convert`` command and its ``hdf5-to-lerobot`` sub-command."""
    parser = subparsers.add_parser("convert", help="convert datasets between formats")
    sub = parser.add_subparsers(dest="convert_command", metavar="SUBCOMMAND")
    p = sub.add_parser(
        "hdf5-to-lerobot",
        help="convert robomimic / IsaacLab-Mimic HDF5 demos (data/demo_N) to a LeRobot v2.1 or v3.0 dataset",
        description="Demos become episodes 0..N-1 in demo order; which demo is which episode is written to "
        "meta/hdf5_demo_map.json. Without a column map the defaults fit policyserve's Franka recorder "
        "(franka_panda config).",
    )
    p.add_argument("--input", required=True, help="HDF5 file")
    p.add_argument("--output", required=True, help="output dataset directory (must be empty or absent)")
    p.add_argument("--column-map", help="column map JSON/TOML file (format: policyserve.data.column_map)")
    p.add_argument("--camera", action="append", metavar="KEY=NAME", help="HDF5 obs image key -> video name (repeat)")
    p.add_argument("--state", action="append", metavar="KEY[,KEY]", help="obs keys concatenated into observation.state")
    p.add_argument("--action-split", action="append", metavar="NAME=START:END", help="action key slice (repeat)")
    p.add_argument("--task", help="task text (default: the file's 'task' attribute or env name)")
    p.add_argument("--fps", type=float, default=20.0, help="frames per second (default 20)")
    p.add_argument("--eval-proportion", type=float, default=0.0, help="share of episodes in the eval split")
    p.add_argument("--layout", choices=("auto", "robomimic", "isaaclab_mimic"), default="auto",
                   help="HDF5 layout of the demos (default auto: detected from the file)")
    p.add_argument(
        "--format", choices=FORMATS, default=V21,
        help="LeRobot layout: v2.1 (default; GR00T's loader needs it) or v3.0 (LeRobot >= 0.4 reads only v3.0)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)
    # convert_hdf5_to_lerobot's parameters, for its errors
    field_flags(p).update({name: f"--{name.replace('_', '-')}" for name in
                           ("task", "fps", "eval_proportion", "layout", "overwrite", "format")})
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def run(args: argparse.Namespace) -> int:
    """Run the conversion and print a one-line summary."""
    from ..data.column_map import ColumnMap
    from ..data.hdf5_to_lerobot import DEMO_MAP_FILE, convert_hdf5_to_lerobot

    column_map = ColumnMap.load(args.column_map) if args.column_map else ColumnMap()
    column_map = column_map.with_flags(args.camera, args.state, args.action_split)
    summary = convert_hdf5_to_lerobot(
        args.input,
        args.output,
        column_map,
        task=args.task,
        fps=args.fps,
        eval_proportion=args.eval_proportion,
        layout=args.layout,
        progress=not args.no_progress,
        overwrite=args.overwrite,
        format=args.format,
    )
    print(
        f"Converted {summary.num_episodes} demos ({summary.layout} layout, {summary.num_frames} frames) to "
        f"LeRobot {args.format} dataset {summary.output} in {summary.seconds:.2f} s ({summary.frames_per_second:.1f} frames/s); "
        f"eval episodes: {summary.eval_episodes or 'none'}; demo map: {summary.output / 'meta' / DEMO_MAP_FILE}"
    )
    return 0
