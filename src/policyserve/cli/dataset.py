"""``policyserve dataset info PATH``: summarise a LeRobot dataset (episodes, fps, features, tasks, modality keys)."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(subparsers: Any) -> None:
    """Add the ``dataset`` command and its ``info`` sub-command."""
    parser = subparsers.add_parser("dataset", help="inspect LeRobot datasets")
    sub = parser.add_subparsers(dest="dataset_command", metavar="SUBCOMMAND")
    info = sub.add_parser("info", help="print episodes, lengths, fps, features, tasks and modality keys")
    info.add_argument("path", help="dataset root (the folder holding meta/, data/, videos/)")
    info.add_argument("--json", action="store_true", help="print the summary as JSON")
    info.set_defaults(func=run)
    parser.set_defaults(func=lambda args: _usage(parser))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def describe(dataset: Any) -> dict[str, Any]:
    """A JSON-ready summary of a :class:`~policyserve.data.lerobot.LeRobotDataset`."""
    m = dataset.modality
    with_files = {c: len(dataset.episodes_with_video_files(c)) for c in dataset.video_columns}
    splits = dataset.info.get("splits") or {}
    return {
        "path": str(dataset.root),
        "version": dataset.version,
        "fps": dataset.fps,
        "num_episodes": dataset.num_episodes,
        "num_frames": dataset.num_frames,
        "episodes": [
            {"episode_index": i, "length": dataset.episode_length(i), "tasks": dataset.episode_tasks(i)}
            for i in dataset.episode_indices
        ],
        "features": {
            name: {
                "dtype": f.get("dtype"),
                "shape": f.get("shape"),
                **({"episodes_with_files": with_files[name]} if name in with_files else {}),
            }
            for name, f in dataset.features.items()
        },
        "tasks": {str(i): t for i, t in sorted(dataset.tasks.items())},
        "splits": splits,
        "split_episodes": {name: dataset.split(name) for name in splits},
        "modality_source": "derived from info.json features" if m.derived else "meta/modality.json",
        "modality": {
            "video": {
                k: {"column": s.column, "has_files": with_files.get(s.column, 0) > 0} for k, s in m.video.items()
            },
            "state": {k: {"column": s.column, "start": s.start, "end": s.end} for k, s in m.state.items()},
            "action": {k: {"column": s.column, "start": s.start, "end": s.end} for k, s in m.action.items()},
            "language": {k: {"column": s.column} for k, s in m.language.items()},
        },
        "has_stats": dataset.stats is not None,
        "hdf5_demo_map": dataset.demo_map,
    }


def _span(entry: dict[str, Any]) -> str:
    if entry["start"] is None and entry["end"] is None:
        return entry["column"]
    start = "" if entry["start"] is None else entry["start"]
    end = "" if entry["end"] is None else entry["end"]
    return f"{entry['column']}[{start}:{end}]"


def _files_note(feature: dict[str, Any], num_episodes: int) -> str:
    have = feature.get("episodes_with_files")
    if have is None or have == num_episodes:
        return ""
    return "  (no video files)" if have == 0 else f"  (video files for {have} of {num_episodes} episodes)"


def _episode_list(indices: list[int]) -> str:
    from ..data.lerobot import describe_indices

    return f"{len(indices)} episode{'s' if len(indices) != 1 else ''} ({describe_indices(indices)})"


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable text of :func:`describe`'s summary."""
    lines = [
        f"Dataset {summary['path']}",
        f"  LeRobot {summary['version']}, {summary['num_episodes']} episodes, {summary['num_frames']} frames, "
        f"{summary['fps']:g} fps, stats.json {'present' if summary['has_stats'] else 'missing'}",
        "Episodes (episode_index: length, tasks):",
    ]
    lines += [f"  {e['episode_index']}: {e['length']}  {'; '.join(e['tasks'])}" for e in summary["episodes"]]
    lines.append("Features:")
    lines += [f"  {name}: {f['dtype']} {f['shape']}{_files_note(f, summary['num_episodes'])}"
              for name, f in summary["features"].items()]
    lines.append("Tasks (task_index: text):")
    lines += [f"  {i}: {t}" for i, t in summary["tasks"].items()]
    if summary["splits"]:
        lines.append("Splits (info.json range -> episodes present):")
        lines += [f"  {k}={v} -> {_episode_list(summary['split_episodes'][k])}" for k, v in summary["splits"].items()]
    lines.append(f"Modality keys ({summary['modality_source']}):")
    mod = summary["modality"]
    for key, e in mod["video"].items():
        lines.append(f"  video.{key} <- {e['column']}{'' if e['has_files'] else '  (no video files)'}")
    for group in ("state", "action"):
        lines += [f"  {group}.{key} <- {_span(e)}" for key, e in mod[group].items()]
    lines += [f"  language {key} <- {e['column']}" for key, e in mod["language"].items()]
    if summary["hdf5_demo_map"]:
        pairs = list(summary["hdf5_demo_map"].items())
        shown = ", ".join(f"{d} -> {e}" for d, e in pairs[:20]) + (", ..." if len(pairs) > 20 else "")
        lines.append(f"HDF5 demos (meta/hdf5_demo_map.json, demo -> episode_index): {shown}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Print the summary of the dataset at ``args.path``."""
    from ..data.lerobot import LeRobotDataset

    summary = describe(LeRobotDataset(args.path))
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0
