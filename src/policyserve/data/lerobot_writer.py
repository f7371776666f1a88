"""Writer of GR00T-flavoured LeRobot v2.1 datasets: one parquet (+ one mp4 per camera) per episode and meta/ files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .lerobot import V2_DATA_PATH, V2_VIDEO_PATH, DatasetError
from .stats import column_stats, compute_stats

CODEBASE_VERSION = "v2.1"
CHUNKS_SIZE = 1000


def _to_arrow(values: np.ndarray) -> Any:
    """A numpy column as an arrow array: (L,) -> scalars, (L, D) -> list<...> cells (as GR00T datasets store)."""
    import pyarrow as pa

    if values.ndim == 1:
        return pa.array(values)
    flat = np.ascontiguousarray(values.reshape(len(values), -1))
    offsets = np.arange(0, flat.size + 1, flat.shape[1], dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.reshape(-1)))


def _feature(values: np.ndarray) -> dict[str, Any]:
    dtype = "bool" if values.dtype == np.bool_ else str(values.dtype)
    return {"dtype": dtype, "shape": [1] if values.ndim == 1 else list(values.shape[1:])}


class LeRobotWriter:
    """Builds a dataset episode by episode; :meth:`finish` writes info.json, episodes, tasks, modality and stats."""

    def __init__(
        self,
        root: str | Path,
        *,
        fps: float,
        modality: dict[str, Any] | None = None,
        robot_type: str = "unknown",
        overwrite: bool = False,
    ) -> None:
        self.root = Path(root)
        if self.root.exists() and any(self.root.iterdir()):
            if not overwrite:
                raise DatasetError(f"output directory {self.root} is not empty (pass overwrite to replace it)")
            shutil.rmtree(self.root)
        (self.root / "meta").mkdir(parents=True, exist_ok=True)
        self.fps = float(fps)
        self.modality = modality
        self.robot_type = robot_type
        self.features: dict[str, Any] = {}
        self.tasks: dict[str, int] = {}
        self.episodes: list[dict[str, Any]] = []
        self.episode_stats: list[dict[str, Any]] = []
        self._stat_columns: dict[str, list[np.ndarray]] = {}
        self._frames = 0

    def task_index(self, text: str) -> int:
        """Index of a task text, registering it on first use."""
        return self.tasks.setdefault(text, len(self.tasks))

    def add_episode(
        self,
        episode_index: int,
        columns: dict[str, np.ndarray],
        *,
        tasks: list[str],
        videos: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Write one episode: per-frame ``columns`` (name -> (L,) or (L, D)), ``videos`` (column -> (L, H, W, 3) uint8).

        ``timestamp``, ``frame_index``, ``episode_index``, ``index``, ``task_index`` and ``next.done`` are added
        when absent (``task_index`` from the first of ``tasks``).
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        from .video import encode_video

        if any(e["episode_index"] == episode_index for e in self.episodes):
            raise DatasetError(f"episode {episode_index} written twice")
        if not tasks:
            raise DatasetError(f"episode {episode_index} needs at least one task text")
        lengths = {name: len(v) for name, v in columns.items()}
        lengths.update({name: len(v) for name, v in (videos or {}).items()})
        if len(set(lengths.values())) != 1:
            raise DatasetError(f"episode {episode_index}: columns have different lengths {lengths}")
        length = next(iter(lengths.values()))
        task_ids = [self.task_index(t) for t in tasks]
        frame = np.arange(length, dtype=np.int64)
        defaults = {
            "timestamp": (frame / self.fps).astype(np.float32),
            "frame_index": frame,
            "episode_index": np.full(length, episode_index, dtype=np.int64),
            "index": frame + self._frames,
            "task_index": np.full(length, task_ids[0], dtype=np.int64),
            "next.done": frame == length - 1,
        }
        data = {name: np.asarray(v) for name, v in columns.items()}
        data.update({k: v for k, v in defaults.items() if k not in data})
        chunk = episode_index // CHUNKS_SIZE
        for column, frames in (videos or {}).items():
            path = self.root / V2_VIDEO_PATH.format(episode_chunk=chunk, video_key=column, episode_index=episode_index)
            encode_video(frames, path, self.fps)
            self.features.setdefault(column, {
                "dtype": "video",
                "shape": list(frames.shape[1:]),
                "names": ["height", "width", "channel"],
                "video_info": {"video.fps": self.fps, "video.codec": "h264", "video.pix_fmt": "yuv420p",
                               "video.is_depth_map": False, "has_audio": False},
            })
        for name, values in data.items():
            feature = _feature(values)
            known = self.features.setdefault(name, feature)
            if known != feature:
                raise DatasetError(f"episode {episode_index}: column {name!r} is {feature}, earlier episodes {known}")
        table = pa.table({name: _to_arrow(values) for name, values in data.items()})
        path = self.root / V2_DATA_PATH.format(episode_chunk=chunk, episode_index=episode_index)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        numeric = {n: v for n, v in data.items() if v.dtype.kind in "fiub" and n not in ("index", "episode_index")}
        for name, values in numeric.items():
            self._stat_columns.setdefault(name, []).append(values)
        self.episode_stats.append({
            "episode_index": episode_index,
            "stats": {n: {**column_stats(v), "count": [len(v)]} for n, v in numeric.items()},
        })
        self.episodes.append({"episode_index": episode_index, "tasks": list(tasks), "length": int(length)})
        self._frames += length

    def finish(self, *, splits: dict[str, str] | None = None, extra_info: dict[str, Any] | None = None) -> Path:
        """Write the meta/ files; returns the dataset root."""
        meta = self.root / "meta"
        self.episodes.sort(key=lambda e: e["episode_index"])
        self.episode_stats.sort(key=lambda e: e["episode_index"])
        indices = [e["episode_index"] for e in self.episodes]
        videos = [name for name, f in self.features.items() if f["dtype"] == "video"]
        info = {
            "codebase_version": CODEBASE_VERSION,
            "robot_type": self.robot_type,
            "total_episodes": len(self.episodes),
            "total_frames": self._frames,
            "total_tasks": len(self.tasks),
            "total_videos": len(videos) * len(self.episodes),
            "total_chunks": (max(indices) // CHUNKS_SIZE + 1) if indices else 0,
            "chunks_size": CHUNKS_SIZE,
            "fps": self.fps,
            "splits": splits or ({"train": f"0:{max(indices) + 1}"} if indices else {}),
            "data_path": V2_DATA_PATH,
            "video_path": V2_VIDEO_PATH if videos else None,
            "features": self.features,
            **(extra_info or {}),
        }
        (meta / "info.json").write_text(json.dumps(info, indent=4))
        (meta / "episodes.jsonl").write_text("".join(json.dumps(e) + "\n" for e in self.episodes))
        (meta / "tasks.jsonl").write_text(
            "".join(json.dumps({"task_index": i, "task": t}) + "\n" for t, i in self.tasks.items())
        )
        (meta / "episodes_stats.jsonl").write_text("".join(json.dumps(e) + "\n" for e in self.episode_stats))
        stats = compute_stats({n: np.concatenate(v) for n, v in self._stat_columns.items()})
        (meta / "stats.json").write_text(json.dumps(stats, indent=4))
        if self.modality is not None:
            (meta / "modality.json").write_text(json.dumps(self.modality, indent=4))
        return self.root
