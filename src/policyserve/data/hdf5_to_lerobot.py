"""Convert robomimic / IsaacLab-Mimic HDF5 demonstrations into a LeRobot dataset (GR00T's v2.1 or LeRobot's v3.0).

Both layouts keep demos under ``data/demo_N`` with ``actions`` and ``obs/<key>``; robomimic stores ``states`` as
one (T, S) array, IsaacLab-Mimic as groups (``states/articulation/robot/...``, ``states/rigid_object/<name>/...``)
plus ``initial_state/...``. Demos become episodes 0..N-1 in numeric demo order (``demo_0, demo_5`` -> episodes
0, 1: LeRobot needs contiguous indices) and ``meta/hdf5_demo_map.json`` records which demo is which episode. Which datasets become cameras, state and action keys is set by a
:class:`~policyserve.data.column_map.ColumnMap`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .column_map import ColumnMap, hdf5_path, state_key_name
from .demos import DemoFile
from .lerobot import DEMO_MAP_FILE, VIDEO_PREFIX, DatasetError
from .lerobot_writer import FORMATS, V21

LAYOUTS = ("robomimic", "isaaclab_mimic")


class ConversionError(DatasetError):
    """The HDF5 file does not fit the expected layout or the column map."""


@dataclass
class ConversionSummary:
    """What a conversion wrote."""

    output: Path
    layout: str
    num_frames: int
    demo_to_episode: dict[str, int]
    eval_episodes: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def num_episodes(self) -> int:
        return len(self.demo_to_episode)

    @property
    def frames_per_second(self) -> float:
        return self.num_frames / self.seconds if self.seconds > 0 else float("inf")


def detect_layout(demo: Any) -> str:
    """``isaaclab_mimic`` when states are groups or there is an ``initial_state`` group, else ``robomimic``."""
    import h5py

    if isinstance(demo.get("states"), h5py.Group) or isinstance(demo.get("initial_state"), h5py.Group):
        return "isaaclab_mimic"
    return "robomimic"


def _resolve_task(task: str | None, demos: DemoFile) -> str:
    env_args = demos.env_args
    return task or demos.task_text or str(env_args.get("task") or env_args.get("env_name") or "") or "unknown task"


def _read(demo: Any, path: str, demo_name: str, length: int | None) -> np.ndarray:
    """Dataset ``path`` of a demo group, checked to have ``length`` rows."""
    import h5py

    node = demo.get(path)
    if not isinstance(node, h5py.Dataset):
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        group = demo.get(parent) if parent else demo
        available = sorted(group) if isinstance(group, h5py.Group) else []
        raise ConversionError(
            f"{demo_name}: no dataset {path!r} (available under {parent or demo_name}/: {available})"
        )
    values = node[()]
    if values.ndim == 0 or (length is not None and len(values) != length):
        raise ConversionError(f"{demo_name}/{path}: expected {length} rows (one per action), got shape {values.shape}")
    return values


def _eval_split(num_episodes: int, eval_proportion: float) -> tuple[dict[str, str], list[int]]:
    if not 0.0 <= eval_proportion < 1.0:
        raise ConversionError(f"eval_proportion must be in [0, 1), got {eval_proportion}")
    n_eval = int(round(eval_proportion * num_episodes))
    if eval_proportion > 0 and num_episodes > 1:
        n_eval = min(max(n_eval, 1), num_episodes - 1)
    if n_eval == 0:
        return {"train": f"0:{num_episodes}"}, []
    cut = num_episodes - n_eval
    return {"train": f"0:{cut}", "eval": f"{cut}:{num_episodes}"}, list(range(cut, num_episodes))


def open_hdf5(path: str | Path) -> DemoFile:
    """The demo file at ``path``; :class:`~policyserve.data.demos.DemoFileError` (a :class:`DatasetError`) names
    the file when it is missing or not HDF5."""
    return DemoFile(path)


def convert_hdf5_to_lerobot(
    input: str | Path,
    output: str | Path,
    column_map: ColumnMap | None = None,
    *,
    task: str | None = None,
    fps: float = 20,
    eval_proportion: float = 0.0,
    layout: str = "auto",
    progress: bool = True,
    overwrite: bool = False,
    format: str = V21,
) -> ConversionSummary:
    """Convert the ``data/demo_N`` groups of an HDF5 file into episodes 0..N-1 of a LeRobot dataset at ``output``.

    ``format`` is ``"v2.1"`` (GR00T's layout, the default) or ``"v3.0"`` (LeRobot >= 0.4).
    """
    import h5py
    from tqdm import tqdm

    from .lerobot_writer import LeRobotWriter

    column_map = column_map or ColumnMap()
    if layout not in ("auto", *LAYOUTS):
        raise ConversionError(f"layout must be 'auto' or one of {LAYOUTS}, got {layout!r}")
    if format not in FORMATS:
        raise ConversionError(f"format must be one of {FORMATS}, got {format!r}")
    input = Path(input)
    started = time.perf_counter()
    source = open_hdf5(input)
    with source.open() as f:
        data = f.get("data")
        if not isinstance(data, h5py.Group):
            raise ConversionError(f"{input}: no 'data' group (expected data/demo_N/...); top level: {sorted(f)}")
        demos = [(n, f"demo_{n}") for n in source.indices]
        if not demos:
            raise ConversionError(f"{input}: no demo_N groups under data/; found {sorted(data)[:20]}")
        found = detect_layout(data[demos[0][1]])
        if layout != "auto" and layout != found:
            raise ConversionError(f"{input}: layout {layout!r} requested but the file looks like {found!r}")
        env_args = source.env_args
        task_text = _resolve_task(task, source)
        splits, eval_episodes = _eval_split(len(demos), eval_proportion)
        writer: LeRobotWriter | None = None
        state_dims: list[int] | None = None
        frames = 0
        for index, (_, name) in enumerate(tqdm(demos, desc="Converting demos", unit="demo", disable=not progress)):
            demo = data[name]
            actions = _read(demo, column_map.action_source, name, None)
            if actions.ndim != 2 or actions.shape[1] < column_map.action_dim:
                raise ConversionError(
                    f"{name}/{column_map.action_source}: column map slices need (T, >={column_map.action_dim}) "
                    f"actions, got shape {actions.shape}"
                )
            length = len(actions)
            parts = [_read(demo, hdf5_path(key), name, length).reshape(length, -1) for key in column_map.state]
            dims = [p.shape[1] for p in parts]
            if state_dims is None:
                state_dims = dims
            elif dims != state_dims:
                raise ConversionError(f"{name}: state dimensions {dims} differ from earlier demos' {state_dims}")
            videos = {}
            for key, video_name in column_map.cameras.items():
                images = _read(demo, hdf5_path(key), name, length)
                if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
                    raise ConversionError(
                        f"{name}/{hdf5_path(key)}: cameras must be uint8 (T, H, W, 3), "
                        f"got {images.dtype} {images.shape}"
                    )
                videos[VIDEO_PREFIX + video_name] = images
            if writer is None:
                writer = LeRobotWriter(
                    output,
                    fps=fps,
                    modality=_modality_json(column_map, state_dims),
                    robot_type=str(env_args.get("env_name", "unknown")),
                    overwrite=overwrite,
                    version=format,
                )
            task_id = writer.task_index(task_text)
            columns = {"action": actions, column_map.language_key: np.full(length, task_id, dtype=np.int64)}
            if parts:
                columns["observation.state"] = np.concatenate(parts, axis=1)
            writer.add_episode(index, columns, tasks=[task_text], videos=videos)
            frames += length
        assert writer is not None
        demo_map = {name: index for index, (_, name) in enumerate(demos)}
        writer.finish(splits=splits)
        (writer.root / "meta" / DEMO_MAP_FILE).write_text(
            json.dumps({"source": str(input.resolve()), "layout": found, "demo_to_episode": demo_map,
                        "env_args": env_args}, indent=4)
        )
    return ConversionSummary(Path(output), found, frames, demo_map, eval_episodes, time.perf_counter() - started)


def _modality_json(column_map: ColumnMap, state_dims: list[int]) -> dict[str, Any]:
    """GR00T modality.json for the written columns."""
    state, start = {}, 0
    for key, dim in zip(column_map.state, state_dims, strict=True):
        state[state_key_name(key)] = {"start": start, "end": start + dim}
        start += dim
    modality: dict[str, Any] = {
        "state": state,
        "action": {k: {"start": s, "end": e} for k, (s, e) in column_map.actions.items()},
        "video": {name: {"original_key": VIDEO_PREFIX + name} for name in column_map.cameras.values()},
        "annotation": {column_map.language_key[len("annotation."):]: {}},
    }
    return modality
