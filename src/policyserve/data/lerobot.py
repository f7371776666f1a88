"""Reader for LeRobot datasets on disk: v2.0/v2.1 (one parquet per episode) and v3.0 (many episodes per file).

GR00T's ``meta/modality.json`` names the state/action groups (``start``/``end`` slices of a column, default
``observation.state`` / ``action``, overridable by ``original_key``), renames video columns and lists the
annotation (language) columns. Without modality.json the keys are derived from ``info.json`` features: one
key per feature (``observation.state`` -> state key ``state``, ``action`` -> action key ``action``,
``observation.images.cam`` -> video key ``cam``, ``annotation.*`` -> language keys, else ``task_index`` ->
language key ``task``).

Episodes are looked up by ``episode_index`` (which may be non-contiguous), never by line position. Reading
states or actions never decodes video. Datasets converted from HDF5 carry ``meta/hdf5_demo_map.json``
(``demo_N`` -> episode index), read by :meth:`LeRobotDataset.episode_for_demo`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import PolicyServeError
from ..types import ModalityConfig, ModalityConfigs

V2_DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
V2_VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
V3_DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V3_VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
DEFAULT_COLUMN = {"state": "observation.state", "action": "action"}
VIDEO_PREFIX = "observation.images."
PREFERRED_LANGUAGE_KEY = "annotation.human.action.task_description"
DEMO_MAP_FILE = "hdf5_demo_map.json"


class DatasetError(PolicyServeError, ValueError):
    """A dataset is missing, malformed, or does not have the requested episode, step or key."""


@dataclass(frozen=True)
class SliceSpec:
    """A state or action key: columns ``column[start:end]`` of every row (whole column when start/end are None)."""

    key: str
    column: str
    start: int | None = None
    end: int | None = None

    @property
    def dim(self) -> int | None:
        return None if self.start is None or self.end is None else self.end - self.start


@dataclass(frozen=True)
class VideoSpec:
    """A camera key and the video feature (column) whose mp4 files hold its frames."""

    key: str
    column: str


@dataclass(frozen=True)
class LanguageSpec:
    """A language key (e.g. ``annotation.human.action.task_description``) and the column of task indices behind it."""

    key: str
    column: str


@dataclass
class DatasetModality:
    """The dataset's keys per modality, parsed from modality.json (``derived=False``) or from info.json features."""

    state: dict[str, SliceSpec] = field(default_factory=dict)
    action: dict[str, SliceSpec] = field(default_factory=dict)
    video: dict[str, VideoSpec] = field(default_factory=dict)
    language: dict[str, LanguageSpec] = field(default_factory=dict)
    derived: bool = False


@dataclass
class Episode:
    """One episode: per-key arrays of shape (L, D), per-frame language strings and requested video frames."""

    episode_index: int
    length: int
    states: dict[str, np.ndarray] = field(default_factory=dict)
    actions: dict[str, np.ndarray] = field(default_factory=dict)
    language: dict[str, list[str]] = field(default_factory=dict)
    videos: dict[str, np.ndarray] = field(default_factory=dict)
    tasks: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _EpisodeRecord:
    """Where one episode lives on disk."""

    episode_index: int
    length: int
    tasks: tuple[str, ...]
    data_file: Path
    in_shared_file: bool  # v3: the data file holds other episodes too
    videos: dict[str, tuple[Path, float | None, float | None]]  # column -> (file, from_ts, to_ts)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path} is not valid JSON: {exc}") from exc


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{lineno} is not valid JSON: {exc}") from exc
    return rows


def column_to_numpy(column: Any) -> np.ndarray:
    """A pyarrow (chunked) column as numpy: list cells become rows of a 2-D array, scalars a 1-D array."""
    import pyarrow as pa

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        values = arr.flatten().to_numpy(zero_copy_only=False)
        n = len(arr)
        if n and values.size % n:
            raise DatasetError(f"column of type {arr.type} has rows of different lengths")
        return values.reshape(n, -1 if n else 0)
    return arr.to_numpy(zero_copy_only=False)


def parse_modality_json(data: dict[str, Any], source: str = "modality.json") -> DatasetModality:
    """Parse GR00T's modality.json into :class:`DatasetModality`."""
    if not isinstance(data, dict):
        raise DatasetError(f"{source}: expected a JSON object, got {type(data).__name__}")
    modality = DatasetModality()
    for group in ("state", "action"):
        for key, entry in (data.get(group) or {}).items():
            entry = entry or {}
            start, end = entry.get("start"), entry.get("end")
            if (start is not None and not isinstance(start, int)) or (end is not None and not isinstance(end, int)):
                raise DatasetError(f"{source}: {group}[{key!r}] start/end must be integers, got {start!r}, {end!r}")
            column = entry.get("original_key") or DEFAULT_COLUMN[group]
            getattr(modality, group)[key] = SliceSpec(key, column, start, end)
    for key, entry in (data.get("video") or {}).items():
        modality.video[key] = VideoSpec(key, (entry or {}).get("original_key") or VIDEO_PREFIX + key)
    for sub, entry in (data.get("annotation") or {}).items():
        full = f"annotation.{sub}"
        modality.language[full] = LanguageSpec(full, (entry or {}).get("original_key") or full)
    return modality


def derive_modality(features: dict[str, Any]) -> DatasetModality:
    """Keys from info.json features when there is no modality.json (one key per feature)."""
    modality = DatasetModality(derived=True)
    for name, feature in features.items():
        dtype = str((feature or {}).get("dtype", ""))
        if dtype in ("video", "image"):
            key = name[len(VIDEO_PREFIX):] if name.startswith(VIDEO_PREFIX) else name
            modality.video[key] = VideoSpec(key, name)
        elif name == "action" or name.startswith("action."):
            key = "action" if name == "action" else name[len("action."):]
            modality.action[key] = SliceSpec(key, name)
        elif name.startswith("observation.") and dtype.startswith("float"):
            key = name[len("observation."):]
            modality.state[key] = SliceSpec(key, name)
        elif name.startswith("annotation."):
            modality.language[name] = LanguageSpec(name, name)
    if not modality.language and "task_index" in features:
        modality.language["task"] = LanguageSpec("task", "task_index")
    return modality


class LeRobotDataset:
    """A LeRobot dataset directory (v2.0, v2.1 or v3.0, detected from ``meta/info.json``)."""

    def __init__(self, path: str | Path) -> None:
        self.root = Path(path).expanduser()
        meta = self.root / "meta"
        if not (meta / "info.json").is_file():
            raise DatasetError(f"not a LeRobot dataset: {meta / 'info.json'} not found")
        self.info: dict[str, Any] = _read_json(meta / "info.json")
        self.features: dict[str, Any] = dict(self.info.get("features") or {})
        fallback = "v3.0" if (meta / "episodes").is_dir() else "v2.0"
        self.version: str = str(self.info.get("codebase_version") or fallback)
        self.fps: float = float(self.info.get("fps", 30))
        modality_path = meta / "modality.json"
        self.modality: DatasetModality = (
            parse_modality_json(_read_json(modality_path), str(modality_path))
            if modality_path.is_file()
            else derive_modality(self.features)
        )
        stats_path = meta / "stats.json"
        self.stats: dict[str, Any] | None = _read_json(stats_path) if stats_path.is_file() else None
        if self.version.startswith("v3"):
            self.tasks, self._episodes = self._load_v3_meta(meta)
        else:
            self.tasks, self._episodes = self._load_v2_meta(meta)

    # ---- metadata -------------------------------------------------------------------------------------------

    def _load_v2_meta(self, meta: Path) -> tuple[dict[int, str], dict[int, _EpisodeRecord]]:
        for name in ("episodes.jsonl", "tasks.jsonl"):
            if not (meta / name).is_file():
                raise DatasetError(f"LeRobot {self.version} dataset {self.root} has no meta/{name}")
        tasks = {}
        for row in _read_jsonl(meta / "tasks.jsonl"):
            if "task_index" not in row or "task" not in row:
                raise DatasetError(f"{meta / 'tasks.jsonl'}: entry {row} lacks task_index or task")
            tasks[int(row["task_index"])] = str(row["task"])
        data_path = self.info.get("data_path", V2_DATA_PATH)
        video_path = self.info.get("video_path", V2_VIDEO_PATH)
        chunks_size = int(self.info.get("chunks_size", 1000))
        episodes: dict[int, _EpisodeRecord] = {}
        for row in _read_jsonl(meta / "episodes.jsonl"):
            if "episode_index" not in row or "length" not in row:
                raise DatasetError(f"{meta / 'episodes.jsonl'}: entry {row} lacks episode_index or length")
            idx = int(row["episode_index"])
            chunk = idx // chunks_size
            videos = {
                column: (
                    self.root / video_path.format(episode_chunk=chunk, video_key=column, episode_index=idx),
                    None,
                    None,
                )
                for column in self.video_columns
            } if video_path else {}
            episodes[idx] = _EpisodeRecord(
                idx,
                int(row["length"]),
                tuple(row.get("tasks") or ()),
                self.root / data_path.format(episode_chunk=chunk, episode_index=idx),
                False,
                videos,
            )
        return tasks, episodes

    def _load_v3_meta(self, meta: Path) -> tuple[dict[int, str], dict[int, _EpisodeRecord]]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not (meta / "tasks.parquet").is_file():
            raise DatasetError(f"LeRobot {self.version} dataset {self.root} has no meta/tasks.parquet")
        task_table = pq.read_table(meta / "tasks.parquet")
        text_column = next((c for c in ("task", "__index_level_0__") if c in task_table.column_names), None)
        if text_column is None or "task_index" not in task_table.column_names:
            raise DatasetError(f"{meta / 'tasks.parquet'} needs columns task_index and task")
        tasks = {
            int(i): str(t)
            for i, t in zip(task_table["task_index"].to_pylist(), task_table[text_column].to_pylist(), strict=True)
        }
        files = sorted((meta / "episodes").rglob("*.parquet"))
        if not files:
            raise DatasetError(f"LeRobot {self.version} dataset {self.root} has no meta/episodes/**/*.parquet")
        tables = []
        for f in files:
            names = [n for n in pq.read_schema(f).names if not n.startswith("stats/")]
            tables.append(pq.read_table(f, columns=names))
        table = pa.concat_tables(tables, promote_options="default")
        rows = table.to_pylist()
        data_path = self.info.get("data_path", V3_DATA_PATH)
        video_path = self.info.get("video_path", V3_VIDEO_PATH)
        episodes: dict[int, _EpisodeRecord] = {}
        for row in rows:
            missing = [c for c in ("episode_index", "length", "data/chunk_index", "data/file_index") if c not in row]
            if missing:
                raise DatasetError(f"{meta / 'episodes'}: episode rows lack columns {missing}")
            idx = int(row["episode_index"])
            videos = {}
            for column in self.video_columns:
                prefix = f"videos/{column}/"
                if row.get(prefix + "chunk_index") is None:
                    continue
                file = self.root / video_path.format(
                    video_key=column,
                    chunk_index=row[prefix + "chunk_index"],
                    file_index=row[prefix + "file_index"],
                )
                videos[column] = (file, row.get(prefix + "from_timestamp"), row.get(prefix + "to_timestamp"))
            episodes[idx] = _EpisodeRecord(
                idx,
                int(row["length"]),
                tuple(row.get("tasks") or ()),
                self.root / data_path.format(chunk_index=row["data/chunk_index"], file_index=row["data/file_index"]),
                True,
                videos,
            )
        return tasks, episodes

    @property
    def video_columns(self) -> list[str]:
        """Video columns: every ``video`` feature of info.json plus the columns modality.json names."""
        columns = [name for name, f in self.features.items() if (f or {}).get("dtype") == "video"]
        return list(dict.fromkeys([*columns, *(s.column for s in self.modality.video.values())]))

    def episodes_with_video_files(self, column: str) -> list[int]:
        """Episodes whose mp4 for the video column ``column`` (e.g. ``observation.images.ego_view``) exists."""
        return [i for i, r in sorted(self._episodes.items()) if column in r.videos and r.videos[column][0].is_file()]

    @property
    def episode_indices(self) -> list[int]:
        """Episode indices present in the dataset, sorted (may be non-contiguous)."""
        return sorted(self._episodes)

    @property
    def num_episodes(self) -> int:
        return len(self._episodes)

    @property
    def num_frames(self) -> int:
        return sum(r.length for r in self._episodes.values())

    @property
    def state_keys(self) -> list[str]:
        return list(self.modality.state)

    @property
    def action_keys(self) -> list[str]:
        return list(self.modality.action)

    @property
    def video_keys(self) -> list[str]:
        return list(self.modality.video)

    @property
    def language_keys(self) -> list[str]:
        return list(self.modality.language)

    def _record(self, episode_index: int) -> _EpisodeRecord:
        try:
            return self._episodes[int(episode_index)]
        except (KeyError, TypeError, ValueError):
            raise DatasetError(
                f"episode_index {episode_index!r} is not in dataset {self.root}; it has {self.num_episodes} "
                f"episodes with indices {describe_indices(self.episode_indices)}"
            ) from None

    def episode_length(self, episode_index: int) -> int:
        """Number of frames of an episode, as declared in the episode metadata."""
        return self._record(episode_index).length

    def episode_tasks(self, episode_index: int) -> list[str]:
        """Task texts listed for an episode in the episode metadata."""
        return list(self._record(episode_index).tasks)

    @cached_property
    def demo_map(self) -> dict[str, int] | None:
        """``{"demo_N": episode_index}`` from ``meta/hdf5_demo_map.json``; None when the dataset has none."""
        path = self.root / "meta" / DEMO_MAP_FILE
        if not path.is_file():
            return None
        mapping = _read_json(path)
        demos = mapping.get("demo_to_episode") if isinstance(mapping, dict) else None
        if not isinstance(demos, dict) or not all(isinstance(v, int) for v in demos.values()):
            raise DatasetError(f"{path}: expected a 'demo_to_episode' object of demo name -> episode index")
        return demos

    @cached_property
    def demo_source(self) -> str | None:
        """The HDF5 file the dataset was converted from (``source`` in ``meta/hdf5_demo_map.json``), if known."""
        path = self.root / "meta" / DEMO_MAP_FILE
        mapping = _read_json(path) if path.is_file() else None
        source = mapping.get("source") if isinstance(mapping, dict) else None
        return str(source) if source else None

    def describe_modality(self) -> list[str]:
        """Where the keys come from: modality.json, or (derived) info.json features, naming every derived key
        and the cameras left out for want of video files."""
        if not self.modality.derived:
            return ["Keys: from meta/modality.json"]
        m = self.modality
        lines = [f"Keys: DERIVED from meta/info.json features (no meta/modality.json in {self.root}): "
                 f"state {list(m.state)}, action {list(m.action)}, video {self.cameras_with_files()}, "
                 f"language {list(m.language)}"]
        missing = [k for k in m.video if k not in self.cameras_with_files()]
        if missing:
            lines.append(f"Cameras left out (no video files): {missing}")
        return lines

    def cameras_with_files(self) -> list[str]:
        """Video keys with an mp4 for at least one episode."""
        return [k for k, spec in self.modality.video.items() if self.episodes_with_video_files(spec.column)]

    def episode_for_demo(self, demo_index: int) -> int:
        """Episode index holding HDF5 demo ``demo_<demo_index>`` (through ``meta/hdf5_demo_map.json``).

        Without a demo map, demo N is episode N. Unknown demos raise :class:`DatasetError` naming the known ones.
        """
        if isinstance(demo_index, bool) or not isinstance(demo_index, (int, np.integer)):
            raise DatasetError(f"demo index must be an integer, got {type(demo_index).__name__} {demo_index!r}")
        demos = self.demo_map
        if demos is None:
            return self._record(int(demo_index)).episode_index
        name = f"demo_{int(demo_index)}"
        if name not in demos:
            known = sorted(demos, key=lambda d: (len(d), d))
            raise DatasetError(
                f"{name} is not in dataset {self.root} (meta/{DEMO_MAP_FILE} lists {len(known)} demos: "
                f"{', '.join(known[:20])}{', ...' if len(known) > 20 else ''})"
            )
        return self._record(demos[name]).episode_index

    def has_video(self, video_key: str, episode_index: int) -> bool:
        """Whether the mp4 for a video key of an episode exists on disk."""
        spec = self._video_spec(video_key)
        entry = self._record(episode_index).videos.get(spec.column)
        return entry is not None and entry[0].is_file()

    def split(self, name: str) -> list[int]:
        """Episode indices of a split ("train"/"eval" ranges ``"start:end"`` in info.json; all when none declared)."""
        splits = self.info.get("splits")
        if not splits:
            return self.episode_indices
        if name not in splits:
            raise DatasetError(f"dataset {self.root} has no split {name!r}; splits: {sorted(splits)}")
        value = splits[name]
        if isinstance(value, list):
            wanted = {int(v) for v in value}
            return [i for i in self.episode_indices if i in wanted]
        try:
            start, end = (int(v) for v in str(value).split(":"))
        except ValueError:
            raise DatasetError(f"split {name!r} = {value!r} is not 'start:end'") from None
        return [i for i in self.episode_indices if start <= i < end]

    # ---- data -----------------------------------------------------------------------------------------------

    def _file_table(self, path: Path, columns: list[str]) -> Any:
        import pyarrow.parquet as pq

        if not path.is_file():
            raise DatasetError(f"data file not found: {path}")
        names = pq.read_schema(path).names
        missing = [c for c in columns if c not in names]
        if missing:
            raise DatasetError(f"{path} has no column(s) {missing}; columns: {names}")
        return pq.read_table(path, columns=columns)

    def read_columns(self, episode_index: int, columns: Iterable[str]) -> dict[str, np.ndarray]:
        """Raw parquet columns of one episode, exactly as stored (list columns as (L, D) arrays)."""
        import pyarrow.compute as pc

        record = self._record(episode_index)
        columns = list(dict.fromkeys(columns))
        if record.in_shared_file:
            table = self._file_table(record.data_file, list(dict.fromkeys([*columns, "episode_index"])))
            table = table.filter(pc.equal(table["episode_index"], record.episode_index))
        else:
            table = self._file_table(record.data_file, columns)
        return {c: column_to_numpy(table[c]) for c in columns}

    def _slices(
        self, specs: dict[str, SliceSpec], keys: list[str] | None, raw: dict[str, np.ndarray], dtype: Any
    ) -> dict[str, np.ndarray]:
        out = {}
        for key in keys if keys is not None else list(specs):
            spec = specs[key]
            values = raw[spec.column]
            values = values.reshape(len(values), -1) if values.ndim == 1 else values
            values = values[:, spec.start : spec.end]
            out[key] = values if dtype is None else values.astype(dtype)
        return out

    def _check_keys(self, kind: str, keys: list[str] | None, known: dict[str, Any]) -> list[str]:
        keys = list(known) if keys is None else list(keys)
        missing = [k for k in keys if k not in known]
        if missing:
            raise DatasetError(f"{kind} key(s) {missing} not in dataset {self.root}; {kind} keys: {list(known)}")
        return keys

    def load_actions(
        self, episode_index: int, keys: list[str] | None = None, *, dtype: Any = np.float32
    ) -> dict[str, np.ndarray]:
        """Action arrays (L, D) per action key of one episode (all keys by default); reads no video."""
        keys = self._check_keys("action", keys, self.modality.action)
        raw, _ = self._episode_columns(episode_index, [self.modality.action[k].column for k in keys])
        return self._slices(self.modality.action, keys, raw, dtype)

    def _episode_columns(self, episode_index: int, columns: list[str]) -> tuple[dict[str, np.ndarray], int]:
        """Columns cut to the episode length (the smaller of the rows stored and the declared length)."""
        raw = self.read_columns(episode_index, columns)
        declared = self._record(episode_index).length
        length = min((len(v) for v in raw.values()), default=declared)
        length = min(length, declared)
        return {c: v[:length] for c, v in raw.items()}, length

    def _video_spec(self, key: str) -> VideoSpec:
        if key not in self.modality.video:
            raise DatasetError(f"video key {key!r} not in dataset {self.root}; video keys: {self.video_keys}")
        return self.modality.video[key]

    def load_video(self, episode_index: int, video_key: str) -> np.ndarray:
        """Decoded frames (L, H, W, 3) uint8 of one camera of one episode."""
        from .video import decode_video

        spec = self._video_spec(video_key)
        entry = self._record(episode_index).videos.get(spec.column)
        if entry is None or not entry[0].is_file():
            where = entry[0] if entry else "(no video entry in the episode metadata)"
            raise DatasetError(f"video {video_key!r} ({spec.column}) of episode {episode_index} not found: {where}")
        path, start, end = entry
        return decode_video(path, start_time=start, end_time=end)

    def load_episode(
        self, episode_index: int, *, video_keys: list[str] | None = [], dtype: Any = np.float32  # noqa: B006
    ) -> Episode:
        """States, actions and language of one episode, plus decoded frames of ``video_keys`` (None = all present).

        ``dtype=None`` keeps state/action values as stored (e.g. float64), bit for bit.
        """
        record = self._record(episode_index)
        m = self.modality
        columns = [s.column for s in (*m.state.values(), *m.action.values())] + [s.column for s in m.language.values()]
        raw, length = self._episode_columns(episode_index, columns)
        episode = Episode(
            episode_index=record.episode_index,
            length=length,
            states=self._slices(m.state, None, raw, dtype),
            actions=self._slices(m.action, None, raw, dtype),
            language={k: self._language(raw[s.column], k) for k, s in m.language.items()},
            tasks=list(record.tasks),
        )
        if video_keys is None:
            video_keys = [k for k in self.video_keys if self.has_video(k, episode_index)]
        for key in video_keys:
            episode.videos[key] = self.load_video(episode_index, key)[:length]
        return episode

    def _language(self, values: np.ndarray, key: str) -> list[str]:
        if values.dtype.kind in "iu":
            unknown = sorted({int(v) for v in np.unique(values)} - set(self.tasks))
            if unknown:
                raise DatasetError(f"language {key!r}: task indices {unknown} not in the dataset's tasks")
            return [self.tasks[int(v)] for v in values]
        return [str(v) for v in values]

    # ---- modality configs -----------------------------------------------------------------------------------

    def default_language_key(self) -> str | None:
        """The language key a policy should use: the task description when present, else the first one."""
        keys = self.language_keys
        if PREFERRED_LANGUAGE_KEY in keys:
            return PREFERRED_LANGUAGE_KEY
        return next((k for k in keys if "task" in k), keys[0] if keys else None)

    def infer_modality_configs(self, action_horizon: int = 16) -> ModalityConfigs:
        """Modality configs covering every state, action and video key, one language key, ``action_horizon`` steps.

        With keys derived from info.json (no modality.json), cameras without any video file are left out.
        """
        if not isinstance(action_horizon, int) or action_horizon < 1:
            raise DatasetError(f"action_horizon must be a positive integer, got {action_horizon!r}")
        language = self.default_language_key()
        cameras = self.cameras_with_files() if self.modality.derived else self.video_keys
        return {
            "video": ModalityConfig(delta_indices=[0], modality_keys=cameras),
            "state": ModalityConfig(delta_indices=[0], modality_keys=self.state_keys),
            "action": ModalityConfig(delta_indices=list(range(action_horizon)), modality_keys=self.action_keys),
            "language": ModalityConfig(delta_indices=[0], modality_keys=[language] if language else []),
        }


def describe_indices(indices: list[int]) -> str:
    """``0..4`` for a contiguous run, else the first 20 indices as a list."""
    if not indices:
        return "(none)"
    if indices == list(range(indices[0], indices[-1] + 1)):
        return f"{indices[0]}..{indices[-1]}"
    shown = ", ".join(map(str, indices[:20]))
    return f"[{shown}{', ...' if len(indices) > 20 else ''}]"
