"""Column map: which HDF5 datasets become which LeRobot columns and GR00T modality keys.

JSON (or TOML) format, every field optional (missing fields take the defaults shown, which fit the Franka
recorder's robomimic files and the registry's ``franka_panda`` config)::

    {
      "cameras": {"table_cam": "ego_view", "wrist_cam": "wrist_view"},
      "state": ["eef_pos", "eef_quat", "gripper_pos"],
      "actions": {"arm": [0, 6], "gripper": [6, 7]},
      "action_source": "actions",
      "language_key": "annotation.human.action.task_description"
    }

- ``cameras``: HDF5 image dataset (uint8 (T, H, W, 3)) -> video key; written as column
  ``observation.images.<video key>`` (an mp4 per episode).
- ``state``: HDF5 datasets concatenated (in this order) into ``observation.state``; each becomes a
  modality.json state key named after the dataset's last path component, sliced ``start:end``.
- ``actions``: action key -> ``[start, end)`` slice of the ``action_source`` dataset; the whole dataset is stored
  as column ``action`` (bit-identical) and the slices go to modality.json.
- ``language_key``: the per-frame task-index column (``annotation.<...>``) holding the task text.

Dataset names are relative to a demo group (``data/demo_N``); a name without ``/`` means ``obs/<name>``, so
``"states/articulation/robot/joint_position"`` reaches into IsaacLab-Mimic state groups.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError

DEFAULT_LANGUAGE_KEY = "annotation.human.action.task_description"


def _default_cameras() -> dict[str, str]:
    return {"table_cam": "ego_view", "wrist_cam": "wrist_view"}


def _default_state() -> list[str]:
    return ["eef_pos", "eef_quat", "gripper_pos"]


def _default_actions() -> dict[str, tuple[int, int]]:
    return {"arm": (0, 6), "gripper": (6, 7)}


@dataclass
class ColumnMap:
    """How HDF5 demo datasets map onto LeRobot columns and modality keys (see the module docstring)."""

    cameras: dict[str, str] = field(default_factory=_default_cameras)
    state: list[str] = field(default_factory=_default_state)
    actions: dict[str, tuple[int, int]] = field(default_factory=_default_actions)
    action_source: str = "actions"
    language_key: str = DEFAULT_LANGUAGE_KEY

    def __post_init__(self) -> None:
        if not isinstance(self.cameras, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in self.cameras.items()
        ):
            raise ConfigError(f"column map 'cameras' must map HDF5 key -> video name, got {self.cameras!r}")
        if isinstance(self.state, str) or not all(isinstance(k, str) and k for k in self.state):
            raise ConfigError(f"column map 'state' must be a list of HDF5 keys, got {self.state!r}")
        self.state = list(self.state)
        names = [state_key_name(k) for k in self.state]
        if len(set(names)) != len(names):
            raise ConfigError(f"column map 'state' keys {self.state} give duplicate state names {names}")
        if len(set(self.cameras.values())) != len(self.cameras):
            raise ConfigError(f"column map 'cameras' has duplicate video names: {self.cameras}")
        if not isinstance(self.actions, dict) or not self.actions:
            raise ConfigError(f"column map 'actions' must map action key -> [start, end], got {self.actions!r}")
        actions = {}
        for name, span in self.actions.items():
            if (
                not isinstance(span, (list, tuple))
                or len(span) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in span)
                or not 0 <= span[0] < span[1]
            ):
                raise ConfigError(
                    f"column map action {name!r}: expected [start, end] with 0 <= start < end, got {span!r}"
                )
            actions[name] = (span[0], span[1])
        self.actions = actions
        if not self.language_key.startswith("annotation."):
            raise ConfigError(f"column map 'language_key' must start with 'annotation.', got {self.language_key!r}")

    @property
    def action_dim(self) -> int:
        """Smallest action width the slices need."""
        return max(end for _, end in self.actions.values())

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "column map") -> ColumnMap:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected an object, got {type(data).__name__}")
        known = {"cameras", "state", "actions", "action_source", "language_key"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {unknown}; known: {sorted(known)}")
        try:
            return cls(**data)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from exc

    @classmethod
    def load(cls, path: str | Path) -> ColumnMap:
        """Read a column map from a ``.json`` or ``.toml`` file."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"column map file not found: {path}")
        try:
            if path.suffix.lower() == ".toml":
                import tomllib

                data = tomllib.loads(path.read_text())
            else:
                data = json.loads(path.read_text())
        except (json.JSONDecodeError, ValueError) as exc:
            raise ConfigError(f"column map file {path} cannot be parsed: {exc}") from exc
        return cls.from_dict(data, str(path))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["actions"] = {k: list(v) for k, v in self.actions.items()}
        return data

    def with_flags(
        self,
        cameras: list[str] | None = None,
        state: list[str] | None = None,
        action_splits: list[str] | None = None,
    ) -> ColumnMap:
        """A copy with CLI overrides: ``KEY=NAME`` cameras, ``KEY[,KEY]`` state lists, ``NAME=START:END`` splits.

        Each given flag kind replaces that part of the map entirely.
        """
        changes: dict[str, Any] = {}
        if cameras:
            changes["cameras"] = dict(_split_pair(c, "cameras entry", "KEY=NAME") for c in cameras)
        if state:
            changes["state"] = [k.strip() for s in state for k in s.split(",") if k.strip()]
        if action_splits:
            changes["actions"] = dict(_parse_action_split(s) for s in action_splits)
        return replace(self, **changes)


def state_key_name(hdf5_key: str) -> str:
    """The modality.json state key of an HDF5 dataset name (its last path component)."""
    return hdf5_key.rstrip("/").rsplit("/", 1)[-1]


def hdf5_path(key: str) -> str:
    """Path of a column-map dataset name inside a demo group (bare names live under ``obs/``)."""
    return key if "/" in key else f"obs/{key}"


def _split_pair(text: str, what: str, form: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise ConfigError(f"{what} expects {form}, got {text!r}")
    return key.strip(), value.strip()


def _parse_action_split(text: str) -> tuple[str, tuple[int, int]]:
    name, span = _split_pair(text, "action_splits entry", "NAME=START:END")
    try:
        start, end = (int(v) for v in span.split(":"))
    except ValueError:
        raise ConfigError(f"action_splits entry expects NAME=START:END with integers, got {text!r}") from None
    return name, (start, end)
