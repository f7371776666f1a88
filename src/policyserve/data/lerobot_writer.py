"""Writer of LeRobot datasets with GR00T's ``meta/modality.json``: v2.1 (GR00T's layout) or v3.0 (LeRobot's current).

v2.1 stores one parquet (+ one mp4 per camera) per episode and ``meta/*.jsonl``; v3.0 stores many episodes per
file (see :mod:`policyserve.data.lerobot_v30`). Both get ``meta/stats.json`` with statistics of every numeric
column and of every video feature (per-channel, [0, 1] scale, as LeRobot computes them), and per-episode
statistics (``meta/episodes_stats.jsonl`` in v2.1, ``stats/...`` columns of ``meta/episodes`` in v3.0).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .lerobot import V2_DATA_PATH, V2_VIDEO_PATH, DatasetError
from .stats import channel_histogram, column_stats, compute_stats, histogram_stats

V21, V30 = "v2.1", "v3.0"
FORMATS = (V21, V30)
CHUNKS_SIZE = 1000
VIDEO_CODEC, VIDEO_PIX_FMT = "h264", "yuv420p"


def to_arrow(values: np.ndarray, *, fixed_size: bool = False) -> Any:
    """A numpy column as an arrow array: (L,) -> scalars, (L, D) -> list cells (fixed-size lists if asked)."""
    import pyarrow as pa

    if values.ndim == 1:
        return pa.array(values)
    flat = np.ascontiguousarray(values.reshape(len(values), -1))
    if fixed_size:
        return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
    offsets = np.arange(0, flat.size + 1, flat.shape[1], dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.reshape(-1)))


def _feature(values: np.ndarray) -> dict[str, Any]:
    dtype = "bool" if values.dtype == np.bool_ else str(values.dtype)
    return {"dtype": dtype, "shape": [1] if values.ndim == 1 else list(values.shape[1:]), "names": None}


class OutputNotEmptyError(DatasetError):
    """The output directory already holds files and ``overwrite`` was not given."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"output directory {path} is not empty (pass overwrite=True to replace it)")
        self.path = path


class EpisodeStorage(Protocol):
    """Where a format puts episode data and videos, and the meta files that index them."""

    def write_data(self, episode_index: int, table: Any, first_index: int) -> dict[str, Any]:
        """Store one episode's frame table; returns the episode's location fields."""

    def write_video(self, episode_index: int, column: str, frames: np.ndarray) -> dict[str, Any]:
        """Store one episode's frames of one camera; returns the episode's location fields."""

    def finish(self, meta: Path, episodes: list[dict[str, Any]], tasks: dict[str, int]) -> dict[str, Any]:
        """Close open files, write the episode and task meta files; returns the format's info.json fields."""


class V21Storage:
    """GR00T's LeRobot v2.1 layout: ``data/chunk-XXX/episode_NNNNNN.parquet``, one mp4 per camera and episode."""

    def __init__(self, root: Path, fps: float) -> None:
        self.root, self.fps = root, fps
        self._videos: set[str] = set()

    def write_data(self, episode_index: int, table: Any, first_index: int) -> dict[str, Any]:
        import pyarrow.parquet as pq

        path = self.root / V2_DATA_PATH.format(episode_chunk=episode_index // CHUNKS_SIZE, episode_index=episode_index)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        return {}

    def write_video(self, episode_index: int, column: str, frames: np.ndarray) -> dict[str, Any]:
        from .video import encode_video

        chunk = episode_index // CHUNKS_SIZE
        encode_video(frames, self.root / V2_VIDEO_PATH.format(
            episode_chunk=chunk, video_key=column, episode_index=episode_index), self.fps)
        self._videos.add(column)
        return {}

    def finish(self, meta: Path, episodes: list[dict[str, Any]], tasks: dict[str, int]) -> dict[str, Any]:
        indices = [e["episode_index"] for e in episodes]
        (meta / "episodes.jsonl").write_text("".join(
            json.dumps({k: e[k] for k in ("episode_index", "tasks", "length")}) + "\n" for e in episodes))
        (meta / "tasks.jsonl").write_text(
            "".join(json.dumps({"task_index": i, "task": t}) + "\n" for t, i in tasks.items())
        )
        (meta / "episodes_stats.jsonl").write_text("".join(
            json.dumps({"episode_index": e["episode_index"], "stats": e["stats"]}) + "\n" for e in episodes))
        return {
            "total_videos": len(self._videos) * len(episodes),
            "total_chunks": (max(indices) // CHUNKS_SIZE + 1) if indices else 0,
            "chunks_size": CHUNKS_SIZE,
            "data_path": V2_DATA_PATH,
            "video_path": V2_VIDEO_PATH if self._videos else None,
        }


class LeRobotWriter:
    """Builds a dataset episode by episode; :meth:`finish` writes info.json, episodes, tasks, modality and stats.

    ``version`` is ``"v2.1"`` (GR00T's loader needs it) or ``"v3.0"`` (LeRobot >= 0.4 reads only this); v3.0
    needs episodes added in order 0, 1, 2, ... and an integer fps. ``data_files_size_in_mb`` /
    ``video_files_size_in_mb`` are v3.0's limits after which a new data / video file is started.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        fps: float,
        modality: dict[str, Any] | None = None,
        robot_type: str = "unknown",
        overwrite: bool = False,
        version: str = V21,
        data_files_size_in_mb: float = 100,
        video_files_size_in_mb: float = 200,
    ) -> None:
        if version not in FORMATS:
            raise DatasetError(f"LeRobot format must be one of {FORMATS}, got {version!r}")
        if version == V30 and (fps <= 0 or abs(fps - round(fps)) > 1e-9):
            raise DatasetError(f"LeRobot v3.0 needs an integer fps, got {fps}")
        self.root = Path(root)
        if self.root.exists() and any(self.root.iterdir()):
            if not overwrite:
                raise OutputNotEmptyError(self.root)
            shutil.rmtree(self.root)
        (self.root / "meta").mkdir(parents=True, exist_ok=True)
        self.version = version
        self.fps = float(fps) if version == V21 else int(round(fps))
        self.modality = modality
        self.robot_type = robot_type
        self.features: dict[str, Any] = {}
        self.tasks: dict[str, int] = {}
        self.episodes: list[dict[str, Any]] = []
        self._stat_columns: dict[str, list[np.ndarray]] = {}
        self._histograms: dict[str, np.ndarray] = {}
        self._video_frames: dict[str, int] = {}
        self._frames = 0
        if version == V30:
            from .lerobot_v30 import V30Storage

            self.storage: EpisodeStorage = V30Storage(
                self.root, self.fps, data_files_size_in_mb, video_files_size_in_mb, CHUNKS_SIZE
            )
        else:
            self.storage = V21Storage(self.root, self.fps)

    def task_index(self, text: str) -> int:
        """Index of a task text, registering it on first use."""
        return self.tasks.setdefault(text, len(self.tasks))

    def _video_feature(self, frames: np.ndarray) -> dict[str, Any]:
        height, width, channels = frames.shape[1:]
        info_key = "video_info" if self.version == V21 else "info"
        info = {"video.fps": self.fps, "video.codec": VIDEO_CODEC, "video.pix_fmt": VIDEO_PIX_FMT,
                "video.is_depth_map": False, "has_audio": False}
        if self.version == V30:
            info = {"video.height": height, "video.width": width, **info, "video.channels": channels}
        names = ["height", "width", "channel" if self.version == V21 else "channels"]
        return {"dtype": "video", "shape": [height, width, channels], "names": names, info_key: info}

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

        if any(e["episode_index"] == episode_index for e in self.episodes):
            raise DatasetError(f"episode {episode_index} written twice")
        if self.version == V30 and episode_index != len(self.episodes):
            raise DatasetError(
                f"LeRobot v3.0 episodes must be numbered 0..N-1 in order: expected episode {len(self.episodes)}, "
                f"got {episode_index}"
            )
        if not tasks:
            raise DatasetError(f"episode {episode_index} needs at least one task text")
        videos = videos or {}
        lengths = {name: len(v) for name, v in columns.items()}
        lengths.update({name: len(v) for name, v in videos.items()})
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
        for name, values in data.items():
            self._check_feature(episode_index, name, _feature(values))
        for column, frames in videos.items():
            self._check_feature(episode_index, column, self._video_feature(np.asarray(frames)))
        order = [n for n in self.features if n in data]
        table = pa.table({n: to_arrow(data[n], fixed_size=self.version == V30) for n in order})
        record: dict[str, Any] = {"episode_index": episode_index, "tasks": list(tasks), "length": int(length)}
        record.update(self.storage.write_data(episode_index, table, self._frames))
        stats: dict[str, Any] = {}
        for column, frames in videos.items():
            record.update(self.storage.write_video(episode_index, column, frames))
            histogram = channel_histogram(frames)
            stats[column] = histogram_stats(histogram, length)
            self._histograms[column] = self._histograms.get(column, 0) + histogram
            self._video_frames[column] = self._video_frames.get(column, 0) + length
        numeric = {n: v for n, v in data.items() if v.dtype.kind in "fiub" and n not in ("index", "episode_index")}
        for name, values in numeric.items():
            self._stat_columns.setdefault(name, []).append(values)
            stats[name] = {**column_stats(values), "count": [len(values)]}
        record["stats"] = stats
        self.episodes.append(record)
        self._frames += length

    def _check_feature(self, episode_index: int, name: str, feature: dict[str, Any]) -> None:
        known = self.features.setdefault(name, feature)
        if known != feature:
            raise DatasetError(f"episode {episode_index}: column {name!r} is {feature}, earlier episodes {known}")

    def finish(self, *, splits: dict[str, str] | None = None, extra_info: dict[str, Any] | None = None) -> Path:
        """Write the meta/ files; returns the dataset root."""
        meta = self.root / "meta"
        self.episodes.sort(key=lambda e: e["episode_index"])
        indices = [e["episode_index"] for e in self.episodes]
        layout = self.storage.finish(meta, self.episodes, self.tasks)
        features = self.features
        if self.version == V30:
            features = {n: f if f["dtype"] == "video" else {**f, "fps": self.fps} for n, f in features.items()}
        info = {
            "codebase_version": self.version,
            "robot_type": self.robot_type,
            "total_episodes": len(self.episodes),
            "total_frames": self._frames,
            "total_tasks": len(self.tasks),
            **{k: v for k, v in layout.items() if k not in ("data_path", "video_path")},
            "fps": self.fps,
            "splits": splits or ({"train": f"0:{max(indices) + 1}"} if indices else {}),
            "data_path": layout["data_path"],
            "video_path": layout["video_path"],
            "features": features,
            **(extra_info or {}),
        }
        (meta / "info.json").write_text(json.dumps(info, indent=4))
        stats = compute_stats({n: np.concatenate(v) for n, v in self._stat_columns.items()})
        stats.update({c: histogram_stats(h, self._video_frames[c]) for c, h in self._histograms.items()})
        (meta / "stats.json").write_text(json.dumps(stats, indent=4))
        if self.modality is not None:
            (meta / "modality.json").write_text(json.dumps(self.modality, indent=4))
        return self.root
