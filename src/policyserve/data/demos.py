"""The one reader of recorded-demo HDF5 files (robomimic layout as ``policyserve record`` writes it, and
IsaacLab-Mimic's).

A file keeps demos under ``data/demo_N``; N need not be contiguous (``demo_0, demo_5``). Per demo: ``actions``
(T, A), the sim ``states`` and ``obs/<key>`` before each action, and the attribute ``num_samples`` (files
without it have ``len(actions)`` samples). ``data.attrs["env_args"]`` is robomimic's JSON description of the
env: policyserve's recorder stores its task name (``task``) and ``env_kwargs`` with ``camera_names`` and
``camera_size``. Every question about such a file (which demos, how long, which state or observation at a
step, which task and camera size) goes through :class:`DemoFile`; its errors name the file and the valid
choices.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from .lerobot import DatasetError, describe_indices

DEMO_NAME = re.compile(r"^demo_(\d+)$")


class DemoFileError(ConfigError, DatasetError):
    """A demo HDF5 file is missing or unreadable, or has no such demo or step."""


class DemoStepError(DemoFileError, IndexError):
    """A step outside a demo's samples."""


def describe_demos(indices: list[int]) -> str:
    """``demo indices 0..4`` for a contiguous run, else the first 20 indices listed."""
    return f"demo indices {describe_indices(indices)}" if indices else "no demos"


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode()
    return str(value)


class DemoFile:
    """A recorded-demo HDF5 file, read on demand (each call opens and closes the file)."""

    def __init__(self, path: str | Path) -> None:
        """Checks that ``path`` is a readable HDF5 file; :class:`DemoFileError` names the file otherwise."""
        self.path = Path(path)
        if not self.path.is_file():
            raise DemoFileError(f"HDF5 demo file not found: {self.path}")
        with self.open():
            pass

    def __repr__(self) -> str:
        return f"DemoFile({str(self.path)!r})"

    @contextmanager
    def open(self) -> Iterator[Any]:
        """The open ``h5py.File`` (read only)."""
        import h5py

        try:
            f = h5py.File(self.path, "r")
        except OSError as exc:
            raise DemoFileError(f"{self.path} is not a readable HDF5 file ({exc})") from None
        with f:
            yield f

    # ---- what the file holds ----------------------------------------------------------------------------------

    @cached_property
    def _data_attrs(self) -> dict[str, Any]:
        with self.open() as f:
            data = f.get("data")
            return dict(data.attrs) if data is not None else {}

    @cached_property
    def indices(self) -> list[int]:
        """The N of every ``data/demo_N`` group, sorted (empty when there is no ``data`` group)."""
        with self.open() as f:
            data = f.get("data")
            names = list(data.keys()) if data is not None else []
        return sorted(int(m.group(1)) for name in names if (m := DEMO_NAME.match(name)))

    @cached_property
    def env_args(self) -> dict[str, Any]:
        """``data.attrs["env_args"]`` parsed (``{}`` when absent; ``{"raw": text}`` when it is not JSON)."""
        text = _text(self._data_attrs.get("env_args"))
        if not text:
            return {}
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return {"raw": text}
        return value if isinstance(value, dict) else {"value": value}

    @property
    def task_text(self) -> str | None:
        """The instruction text stored as ``data.attrs["task"]`` (e.g. "lift the cube")."""
        return _text(self._data_attrs.get("task"))

    @property
    def task(self) -> str | None:
        """The built-in task name the demos were recorded in (``env_args["task"]``, e.g. "lift"), if recorded."""
        task = self.env_args.get("task")
        return task.lower() if isinstance(task, str) and task else None

    @property
    def camera_size(self) -> tuple[int, int] | None:
        """(height, width) of the recorded cameras from ``env_args["env_kwargs"]["camera_size"]``, if recorded."""
        kwargs = self.env_args.get("env_kwargs")
        size = kwargs.get("camera_size") if isinstance(kwargs, dict) else None
        if isinstance(size, int) and not isinstance(size, bool):
            return (size, size)
        if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) for v in size):
            return (int(size[0]), int(size[1]))
        return None

    @property
    def camera_names(self) -> tuple[str, ...] | None:
        """The recorded cameras from ``env_args["env_kwargs"]["camera_names"]``, if recorded."""
        kwargs = self.env_args.get("env_kwargs")
        names = kwargs.get("camera_names") if isinstance(kwargs, dict) else None
        return tuple(str(n) for n in names) if isinstance(names, (list, tuple)) else None

    # ---- one demo ---------------------------------------------------------------------------------------------

    def _group(self, f: Any, demo_index: int) -> Any:
        if isinstance(demo_index, bool) or not isinstance(demo_index, (int, np.integer)):
            raise DemoFileError(f"demo index must be an integer, got {type(demo_index).__name__} {demo_index!r}")
        group = f.get(f"data/demo_{int(demo_index)}")
        if group is None:
            raise DemoFileError(f"demo index {demo_index} is out of range: {self.path} has "
                                f"{describe_demos(self.indices)} ({len(self.indices)} demos)")
        return group

    @staticmethod
    def _samples(group: Any) -> int:
        n = group.attrs.get("num_samples")
        return int(n) if n is not None else len(group["actions"])

    @contextmanager
    def demo(self, demo_index: int) -> Iterator[Any]:
        """The h5py group ``data/demo_<demo_index>``; :class:`DemoFileError` naming the demos otherwise."""
        with self.open() as f:
            yield self._group(f, demo_index)

    def length(self, demo_index: int) -> int:
        """Number of samples (actions) of demo ``demo_index``."""
        with self.demo(demo_index) as group:
            return self._samples(group)

    def check_step(self, demo_index: int, step: int) -> int:
        """Number of samples of the demo; :class:`DemoFileError` naming the valid steps if ``step`` is not one."""
        length = self.length(demo_index)
        if not 0 <= step < length:
            raise DemoStepError(f"start step {step} is out of range for demo_{demo_index} of {self.path} "
                                f"({length} steps: valid start steps are 0..{length - 1})")
        return length

    def actions(self, demo_index: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Recorded actions ``[start:stop]`` of a demo, as stored."""
        with self.demo(demo_index) as group:
            return np.asarray(group["actions"][start:stop])

    def state(self, demo_index: int, step: int = 0) -> dict[str, Any]:
        """The sim state before action ``step``, for ``env.reset(options={"state": ...})`` (policyserve recordings).

        Files recorded before warm starts were saved give no ``warmstart`` (those restore with a zero one).
        """
        self.check_step(demo_index, step)
        with self.demo(demo_index) as group:
            missing = [k for k in ("states", "gripper_actions") if k not in group] + [
                k for k in ("model_file", "initial_joint") if k not in group.attrs]
            if missing:
                raise DemoFileError(f"demo_{demo_index} of {self.path} has no {missing}: only demos recorded by "
                                    "policyserve record can be restored into the built-in envs")
            state = {
                "states": np.asarray(group["states"][step], dtype=np.float64),
                "model_file": _text(group.attrs["model_file"]),
                "gripper_action": np.asarray(group["gripper_actions"][step], dtype=np.float64),
                "initial_joint": np.asarray(group.attrs["initial_joint"], dtype=np.float64),
                "step": int(step),
            }
            if "warmstarts" in group:
                state["warmstart"] = np.asarray(group["warmstarts"][step], dtype=np.float64)
            return state

    def observation(self, demo_index: int, step: int = 0) -> dict[str, np.ndarray]:
        """The recorded observation before action ``step`` (every ``obs/<key>`` dataset)."""
        self.check_step(demo_index, step)
        with self.demo(demo_index) as group:
            obs = group.get("obs")
            return {} if obs is None else {k: np.asarray(v[step]) for k, v in obs.items() if hasattr(v, "shape")}
