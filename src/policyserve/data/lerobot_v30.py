"""LeRobot v3.0 file layout: many episodes per data / video file, episode index in ``meta/episodes/``.

``data/chunk-XXX/file-YYY.parquet`` holds consecutive episodes' frames (rows ``dataset_from_index`` to
``dataset_to_index`` of the dataset); ``videos/<column>/chunk-XXX/file-YYY.mp4`` holds consecutive episodes' frames
of one camera (an episode spans ``from_timestamp`` to ``to_timestamp`` of the file); a new file is started once a
file passes its size limit (counted as the Arrow size of the rows / the encoded video bytes written to it). ``meta/episodes/chunk-000/file-000.parquet`` has one row per episode with these
locations and the episode's statistics (``stats/<feature>/<stat>``); ``meta/tasks.parquet`` maps task texts
(the pandas index, as LeRobot writes it) to ``task_index``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .lerobot import V3_DATA_PATH, V3_VIDEO_PATH

V3_EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V3_TASKS_PATH = "meta/tasks.parquet"


def next_file(chunk: int, file: int, chunks_size: int) -> tuple[int, int]:
    """The (chunk, file) index after ``(chunk, file)``: a chunk holds ``chunks_size`` files."""
    return (chunk + 1, 0) if file == chunks_size - 1 else (chunk, file + 1)


def flatten(prefix: str, value: dict[str, Any]) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"<prefix>/a/b": 1}`` (LeRobot's flattened column names)."""
    out = {}
    for key, item in value.items():
        name = f"{prefix}/{key}"
        out.update(flatten(name, item) if isinstance(item, dict) else {name: item})
    return out


def write_tasks_parquet(path: Path, tasks: dict[str, int]) -> None:
    """``meta/tasks.parquet``: column ``task_index``, task texts as the pandas index (``DataFrame.loc[text]``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ordered = sorted(tasks.items(), key=lambda item: item[1])
    pandas_meta = {
        "index_columns": ["task"],
        "column_indexes": [],
        "columns": [
            {"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64",
             "metadata": None},
            {"name": "task", "field_name": "task", "pandas_type": "unicode", "numpy_type": "object", "metadata": None},
        ],
        "creator": {"library": "pyarrow", "version": pa.__version__},
        "pandas_version": "2.2.0",
    }
    table = pa.table({
        "task_index": pa.array([i for _, i in ordered], pa.int64()),
        "task": pa.array([t for t, _ in ordered], pa.string()),
    }).replace_schema_metadata({"pandas": json.dumps(pandas_meta)})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


class _VideoFiles:
    """The mp4 file being filled for one camera."""

    def __init__(self) -> None:
        self.chunk = self.file = 0
        self.writer: Any = None


class V30Storage:
    """Writes episodes into LeRobot v3.0's shared data and video files (see the module docstring)."""

    def __init__(
        self, root: Path, fps: int, data_files_size_in_mb: float, video_files_size_in_mb: float, chunks_size: int
    ) -> None:
        self.root, self.fps, self.chunks_size = root, fps, chunks_size
        self.data_limit, self.video_limit = data_files_size_in_mb, video_files_size_in_mb
        self._data_chunk = self._data_file = 0
        self._data_writer: Any = None
        self._data_bytes = 0
        self._videos: dict[str, _VideoFiles] = {}

    def _data_path(self) -> Path:
        return self.root / V3_DATA_PATH.format(chunk_index=self._data_chunk, file_index=self._data_file)

    def write_data(self, episode_index: int, table: Any, first_index: int) -> dict[str, Any]:
        import pyarrow.parquet as pq

        if self._data_writer is None:
            self._data_path().parent.mkdir(parents=True, exist_ok=True)
            self._data_writer = pq.ParquetWriter(self._data_path(), table.schema)
        self._data_writer.write_table(table)
        self._data_bytes += table.nbytes
        location = {
            "data/chunk_index": self._data_chunk,
            "data/file_index": self._data_file,
            "dataset_from_index": first_index,
            "dataset_to_index": first_index + table.num_rows,
        }
        if self._data_bytes / 2**20 >= self.data_limit:
            self._data_writer.close()
            self._data_writer, self._data_bytes = None, 0
            self._data_chunk, self._data_file = next_file(self._data_chunk, self._data_file, self.chunks_size)
        return location

    def write_video(self, episode_index: int, column: str, frames: np.ndarray) -> dict[str, Any]:
        from .video import VideoWriter

        files = self._videos.setdefault(column, _VideoFiles())
        path = self.root / V3_VIDEO_PATH.format(video_key=column, chunk_index=files.chunk, file_index=files.file)
        if files.writer is None:
            files.writer = VideoWriter(path, self.fps)
        start = files.writer.num_frames
        files.writer.write(frames)
        prefix = f"videos/{column}/"
        location = {
            prefix + "chunk_index": files.chunk,
            prefix + "file_index": files.file,
            prefix + "from_timestamp": start / self.fps,
            prefix + "to_timestamp": files.writer.num_frames / self.fps,
        }
        if files.writer.num_bytes / 2**20 >= self.video_limit:
            files.writer.close()
            files.writer = None
            files.chunk, files.file = next_file(files.chunk, files.file, self.chunks_size)
        return location

    def finish(self, meta: Path, episodes: list[dict[str, Any]], tasks: dict[str, int]) -> dict[str, Any]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._data_writer is not None:
            self._data_writer.close()
            self._data_writer = None
        for files in self._videos.values():
            if files.writer is not None:
                files.writer.close()
                files.writer = None
        rows = []
        for episode in episodes:
            row = {k: v for k, v in episode.items() if k != "stats"}
            row.update(flatten("stats", episode["stats"]))
            row.update({"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
            rows.append(row)
        path = self.root / V3_EPISODES_PATH.format(chunk_index=0, file_index=0)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), path)
        write_tasks_parquet(self.root / V3_TASKS_PATH, tasks)
        return {
            "chunks_size": self.chunks_size,
            "data_files_size_in_mb": self.data_limit,
            "video_files_size_in_mb": self.video_limit,
            "data_path": V3_DATA_PATH,
            "video_path": V3_VIDEO_PATH if self._videos else None,
        }
