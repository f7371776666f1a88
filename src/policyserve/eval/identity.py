"""Checks that evaluation inputs belong together, so a comparison or rollout never reports on mismatched data.

- :func:`demo_reset_options`: the one way a run that starts from demo N resets a policy (``demo_index``, which a
  replay resolves to its episode through the dataset's demo map, also when the HDF5 file has gaps).
- :func:`check_replay_identity`: the replay serves the dataset converted from this HDF5 file: the source file
  recorded in the dataset's ``meta/hdf5_demo_map.json``, the demo it replays, the episode's length and its
  first action all match the file's. A mismatch is an :class:`IdentityError` naming both files.
- :func:`demo_env_settings`: the task and camera size recorded in the HDF5 file's ``env_args``; a given value
  that conflicts with the recorded one is an error.
- :func:`camera_size_warning`: the env renders cameras at another size (or aspect ratio) than the policy
  declares it was trained on (``get_modality_dims().video``, or ``image_size`` in its reset info, which is
  how a model server declares it over the wire).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..data.demos import DemoFile

ACTION_TOLERANCE = 1e-5
"""Largest |served - recorded| first-action difference (after float32 rounding) that still counts as equal."""


class IdentityError(ConfigError):
    """The replay does not serve the demo of this HDF5 file (another dataset, demo or episode)."""


class CameraSizeWarning(UserWarning):
    """The env's camera size differs from the size the policy declares (it will resize or squash frames)."""


def demo_reset_options(demo_index: int | list[int], start_step: int | list[int] = 0) -> dict[str, Any]:
    """Policy reset options that start demo ``demo_index`` (an int, or one per env) at ``start_step``."""
    return {"demo_index": demo_index, "step_index": start_step}


def _entry(value: Any, env: int | None) -> Any:
    """The value for one env of a reply's info (lists hold one entry per env)."""
    if isinstance(value, (list, tuple)):
        return value[env or 0] if len(value) > (env or 0) else None
    return value


def _same_file(a: str | Path, b: str | Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def check_replay_identity(demos: DemoFile, demo_index: int, start_step: int, info: Mapping[str, Any],
                          first_action: np.ndarray | None, where: str, env: int | None = None) -> None:
    """Raise :class:`IdentityError` unless the replay whose first reply is ``info`` (with ``first_action`` the
    env action it gave, for env ``env`` of a batch) replays demo ``demo_index`` of ``demos`` from
    ``start_step``.

    Accepted: the dataset's recorded source is this file, or a file of the same name elsewhere (a copy) whose
    episode length and first action match this file's. ``where`` names the replay server in the message.
    """
    source = info.get("demo_source")
    if not isinstance(source, str):
        raise IdentityError(
            f"the replay server {where} serves a dataset without meta/hdf5_demo_map.json (not converted from an HDF5 "
            f"file), so it cannot be checked against {demos.path}: serve the dataset converted from {demos.path}")
    served_demo = _entry(info.get("demo_index"), env)
    if served_demo != demo_index:
        raise IdentityError(f"the replay server {where} replays demo_{served_demo} of {source}, not demo_{demo_index} "
                            f"of {demos.path}")
    if not _same_file(source, demos.path) and Path(source).name != demos.path.name:
        raise IdentityError(f"the replay server {where} serves the dataset converted from {source}, not from "
                            f"{demos.path}")
    length = demos.length(demo_index)
    served_length = _entry(info.get("episode_length"), env)
    if served_length != length:
        raise IdentityError(f"the replay server {where} replays an episode of {served_length} steps as "
                            f"demo_{demo_index} (dataset converted from {source}), but demo_{demo_index} of "
                            f"{demos.path} has {length}")
    if first_action is None:
        return
    recorded = np.asarray(demos.actions(demo_index, start_step, start_step + 1), dtype=np.float64).reshape(-1)
    served = np.asarray(first_action, dtype=np.float64).reshape(-1)
    if recorded.shape != served.shape:
        raise IdentityError(f"the replay server {where} serves {served.size}-D actions for demo_{demo_index} (dataset "
                            f"converted from {source}), but {demos.path} records {recorded.size}-D actions")
    diff = float(np.max(np.abs(recorded - served))) if served.size else 0.0
    if diff > ACTION_TOLERANCE * max(1.0, float(np.max(np.abs(recorded), initial=0.0))):
        raise IdentityError(f"the replay server {where} does not replay demo_{demo_index} of {demos.path}: its action "
                            f"at step {start_step} differs from the recorded one by {diff:.3g} (dataset converted "
                            f"from {source})")


def _recorded_or_given(name: str, given: Any, recorded: Any, demos: DemoFile) -> Any:
    if given is not None and recorded is not None and given != recorded:
        raise ConfigError(f"{name} {given!r} conflicts with {demos.path}, recorded with {name} {recorded!r} "
                          f"(env_args); leave {name} out to use the recorded one")
    return recorded if given is None else given


def demo_env_settings(demos: DemoFile, task: str | None = None,
                      camera_size: tuple[int, int] | None = None) -> tuple[str, tuple[int, int] | None]:
    """The task and camera size to run the demos of ``demos`` in: the recorded ones, or the given ones where the
    file records none. A given value that differs from the recorded one is a :class:`ConfigError`; so is a
    file that records no task when none is given. The camera size is None when neither says."""
    size = None if camera_size is None else (int(camera_size[0]), int(camera_size[1]))
    resolved_task = _recorded_or_given("task", None if task is None else task.lower(), demos.task, demos)
    if resolved_task is None:
        raise ConfigError(f"{demos.path} does not record its task (no 'task' in env_args); give the task")
    return resolved_task, _recorded_or_given("camera_size", size, demos.camera_size, demos)


def camera_size_warning(env_size: tuple[int, int], declared: Mapping[str, tuple[int, int]]) -> str | None:
    """One line naming both sizes when the env's (height, width) differs from a camera size the policy declares
    (``ModalityDims.video``); None when they agree or the policy declares none."""
    env_h, env_w = int(env_size[0]), int(env_size[1])
    for key, (h, w) in declared.items():
        if (int(h), int(w)) == (env_h, env_w):
            continue
        aspect = (" and changes the aspect ratio (frames are squashed)" if env_h * int(w) != env_w * int(h) else "")
        return (f"the env renders cameras at {env_h}x{env_w} but the policy declares {key} at {int(h)}x{int(w)}: "
                f"frames are resized{aspect}; pass the camera size the policy was trained on")
    return None


def declared_camera_sizes(policy: Any, info: Mapping[str, Any] | None = None) -> dict[str, tuple[int, int]]:
    """Camera sizes the policy declares: ``get_modality_dims().video``; from a reply such as a model's reset
    info, ``info["camera_sizes"]`` (each camera's (H, W) in the training data) or else ``info["image_size"]``
    ((H, W) every camera is resized to) as ``{"every camera": (H, W)}``."""
    declared = {k: (int(h), int(w)) for k, (h, w) in policy.get_modality_dims().video.items()}
    cameras = (info or {}).get("camera_sizes")
    if isinstance(cameras, Mapping) and cameras and all(_is_size(v) for v in cameras.values()):
        for key, (h, w) in cameras.items():
            declared.setdefault(str(key), (int(h), int(w)))
        return declared
    size = (info or {}).get("image_size")
    if _is_size(size):
        declared.setdefault("every camera", (int(size[0]), int(size[1])))
    return declared


def _is_size(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value)


def warn_camera_size(env_size: tuple[int, int], policy: Any, info: Mapping[str, Any] | None = None) -> str | None:
    """Warn once (:class:`CameraSizeWarning`) when :func:`camera_size_warning` finds a mismatch against
    :func:`declared_camera_sizes`; returns the message (None: nothing to warn about)."""
    message = camera_size_warning(env_size, declared_camera_sizes(policy, info))
    if message is not None:
        warnings.warn(message, CameraSizeWarning, stacklevel=2)
    return message
