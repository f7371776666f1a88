"""openpi's flat observation/action keys <-> the served policy's GR00T modality keys.

An openpi client sends one unbatched observation such as ``{"observation/image": (H, W, 3) uint8,
"observation/wrist_image": ..., "observation/state": (D,), "prompt": str}`` and expects
``{"actions": (H, D)}``. An :class:`OpenpiKeyMap` says which openpi key feeds which GR00T key:

- ``video``: openpi key -> GR00T video key;
- ``state``: openpi key -> list of GR00T state keys; the vector's last axis is split into them in order
  (sizes from ``dims``, else the policy's declared sizes; a single key takes the whole vector);
- ``language``: openpi key -> GR00T language key; ``default_prompt`` is used when the observation has none;
- ``actions``: openpi key -> list of GR00T action keys, concatenated on the last axis in that order.

A group left out of the map gets its default from the policy's modality config: the first two video keys
from ``observation/image`` and ``observation/wrist_image`` (further ones from ``observation/<key>``), every
state key from one ``observation/state`` vector, the language key from ``prompt``, every action key into
``actions``. For the built-in ``franka_panda`` config that is exactly openpi's DROID/LIBERO-style layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, ValidationError
from ..jsonio import read_json_object
from ..types import ModalityConfigs, ModalityDims

IMAGE_KEYS = ("observation/image", "observation/wrist_image")
STATE_KEY = "observation/state"
PROMPT_KEY = "prompt"
ACTIONS_KEY = "actions"
_GROUPS = ("video", "state", "language", "actions")
_WHERE = "openpi observation"


@dataclass
class OpenpiKeyMap:
    """openpi key <-> GR00T key map (see the module doc); a ``None`` group takes its default."""

    video: dict[str, str] | None = None
    state: dict[str, list[str]] | None = None
    language: dict[str, str] | None = None
    actions: dict[str, list[str]] | None = None
    dims: dict[str, int] = field(default_factory=dict)
    """State key -> size, for splitting a state vector when the policy declares no sizes."""
    default_prompt: str | None = None

    def __post_init__(self) -> None:
        for name in ("state", "actions"):
            group = getattr(self, name)
            if group is not None:
                setattr(self, name, {k: _key_list(v, f"openpi key map: {name}[{k!r}]") for k, v in group.items()})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "openpi key map") -> OpenpiKeyMap:
        """Build from ``{"video": {openpi: gr00t}, "state": {openpi: [gr00t, ...]}, "language": {...},
        "actions": {openpi: [gr00t, ...]}, "dims": {gr00t: n}, "default_prompt": str}``; a state or action
        entry may name one key as a string."""
        unknown = sorted(set(data) - {*_GROUPS, "dims", "default_prompt"})
        if unknown:
            raise ConfigError(f"{source}: unknown entries {unknown}; expected {', '.join(_GROUPS)}, dims, "
                              "default_prompt")
        groups: dict[str, Any] = {}
        for name in _GROUPS:
            if name not in data:
                continue
            group = data[name]
            if not isinstance(group, Mapping) or not all(isinstance(k, str) for k in group):
                raise ConfigError(f"{source}: {name!r} must map openpi key -> GR00T key(s), got {group!r}")
            if name in ("state", "actions"):
                groups[name] = {k: _key_list(v, f"{source}: {name}[{k!r}]") for k, v in group.items()}
            elif not all(isinstance(v, str) for v in group.values()):
                raise ConfigError(f"{source}: {name!r} must map openpi key -> one GR00T key (str), got {group!r}")
            else:
                groups[name] = dict(group)
        dims = data.get("dims", {})
        if not isinstance(dims, Mapping) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in dims.values()):
            raise ConfigError(f"{source}: 'dims' must map state key -> positive int, got {dims!r}")
        prompt = data.get("default_prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise ConfigError(f"{source}: 'default_prompt' must be a string, got {prompt!r}")
        return cls(**groups, dims=dict(dims), default_prompt=prompt)

    @classmethod
    def from_file(cls, path: str | Path) -> OpenpiKeyMap:
        """Read a JSON key map file (see :meth:`from_dict`)."""
        return cls.from_dict(read_json_object(path, "openpi key map"), str(path))


def _key_list(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(f"{where}: expected a GR00T key or a non-empty list of keys, got {value!r}")


def default_video_keys(video_keys: list[str]) -> dict[str, str]:
    """openpi image key -> GR00T video key, by position (see the module doc)."""
    return {(IMAGE_KEYS[i] if i < len(IMAGE_KEYS) else f"observation/{key}"): key
            for i, key in enumerate(video_keys)}


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"shape {value.shape} dtype {value.dtype}"
    return f"{type(value).__name__} {value!r:.60}"


class OpenpiMapping:
    """An :class:`OpenpiKeyMap` checked against the served policy: maps each request and reply."""

    def __init__(self, key_map: OpenpiKeyMap, configs: ModalityConfigs, dims: ModalityDims | None = None) -> None:
        dims = dims or ModalityDims()
        self.configs = configs
        keys = {m: list(configs[m].modality_keys) if m in configs else [] for m in ("video", "state", "language")}
        action_keys = list(configs["action"].modality_keys)
        self.video = key_map.video if key_map.video is not None else default_video_keys(keys["video"])
        self.state = key_map.state if key_map.state is not None else (
            {STATE_KEY: keys["state"]} if keys["state"] else {})
        self.language = key_map.language if key_map.language is not None else (
            {PROMPT_KEY: keys["language"][0]} if keys["language"] else {})
        self.actions = key_map.actions if key_map.actions is not None else {ACTIONS_KEY: action_keys}
        self.default_prompt = key_map.default_prompt
        self.horizons = {m: configs[m].horizon for m in ("video", "state", "language") if m in configs}
        self._check_targets("video", {k: [v] for k, v in self.video.items()}, keys["video"])
        self._check_targets("state", self.state, keys["state"])
        self._check_targets("language", {k: [v] for k, v in self.language.items()}, keys["language"])
        for openpi_key, targets in self.actions.items():
            unknown = [t for t in targets if t not in action_keys]
            if unknown:
                raise ConfigError(f"openpi key map: actions[{openpi_key!r}] names {unknown}, not action keys of the "
                                  f"policy ({action_keys})")
        self.state_sizes: dict[str, list[int] | None] = {}
        for openpi_key, targets in self.state.items():
            if len(targets) == 1:
                self.state_sizes[openpi_key] = None
                continue
            sizes = {t: key_map.dims.get(t, dims.state.get(t)) for t in targets}
            unknown = [t for t, n in sizes.items() if n is None]
            if unknown:
                raise ConfigError(
                    f"openpi key map: cannot split {openpi_key!r} into {targets}: the size of {unknown} is unknown "
                    "(the policy declares none); give them in the key map's \"dims\" (state key -> size), or map "
                    "each state key to its own openpi key")
            self.state_sizes[openpi_key] = [int(n) for n in sizes.values()]  # type: ignore[arg-type]
        self.action_horizon = configs["action"].delta_indices[-1] - configs["action"].delta_indices[0] + 1
        self.action_dims = {k: (sum(dims.action[t] for t in ts) if all(t in dims.action for t in ts) else None)
                            for k, ts in self.actions.items()}

    @staticmethod
    def _check_targets(modality: str, table: dict[str, list[str]], policy_keys: list[str]) -> None:
        fed = [t for targets in table.values() for t in targets]
        unknown = [t for t in fed if t not in policy_keys]
        if unknown:
            raise ConfigError(f"openpi key map: {modality} key(s) {unknown} are not {modality} keys of the policy "
                              f"({policy_keys})")
        twice = sorted({t for t in fed if fed.count(t) > 1})
        if twice:
            raise ConfigError(f"openpi key map: {modality} key(s) {twice} are fed by more than one openpi key")
        missing = [k for k in policy_keys if k not in fed]
        if missing:
            raise ConfigError(f"openpi key map: the policy's {modality} key(s) {missing} are fed by no openpi key; "
                              f"add them to the key map's {modality!r} group")

    def metadata(self) -> dict[str, Any]:
        """What the openpi door sends on connect: the keys it reads and the action layout it answers."""
        return {
            "server": "policyserve",
            "observation_keys": sorted([*self.video, *self.state, *self.language]),
            "image_keys": sorted(self.video),
            "state_sizes": {k: (sum(s) if s else None) for k, s in self.state_sizes.items()},
            "action_keys": {k: list(v) for k, v in self.actions.items()},
            "action_horizon": self.action_horizon,
            "action_dims": self.action_dims,
        }

    # -- requests ----------------------------------------------------------------------------------
    def observation(self, obs: Any) -> dict[str, Any]:
        """The nested GR00T observation (batch of one) for an openpi observation map."""
        if not isinstance(obs, Mapping):
            raise ValidationError(_WHERE, None, "a map of openpi keys to values", _describe(obs))
        nested: dict[str, dict[str, Any]] = {"video": {}, "state": {}, "language": {}}
        for openpi_key, target in self.video.items():
            nested["video"][target] = self._frames(obs, openpi_key, "video", 3, np.uint8, "(H, W, C) uint8 image")
        for openpi_key, targets in self.state.items():
            frames = self._frames(obs, openpi_key, "state", 1, None, "(D,) state vector")
            if not np.issubdtype(frames.dtype, np.number) and frames.dtype != np.bool_:
                raise ValidationError(_WHERE, openpi_key, "a numeric state vector", _describe(obs[openpi_key]))
            frames = frames.astype(np.float32, copy=False)
            sizes = self.state_sizes[openpi_key]
            if sizes is None:
                nested["state"][targets[0]] = frames
                continue
            if frames.shape[-1] != sum(sizes):
                layout = " + ".join(f"{t} {n}" for t, n in zip(targets, sizes))
                raise ValidationError(_WHERE, openpi_key, f"a state vector of {sum(sizes)} values ({layout})",
                                      _describe(obs[openpi_key]))
            for target, part in zip(targets, np.split(frames, np.cumsum(sizes)[:-1], axis=-1)):
                nested["state"][target] = part
        for openpi_key, target in self.language.items():
            text = obs.get(openpi_key, self.default_prompt)
            if isinstance(text, np.ndarray) and text.ndim == 0:
                text = text.item()
            if isinstance(text, bytes):
                text = text.decode("utf-8", "replace")
            if not isinstance(text, str):
                expected = "a str instruction" + ("" if self.default_prompt is None else " (or none: default_prompt)")
                raise ValidationError(_WHERE, openpi_key, expected,
                                      "missing" if openpi_key not in obs else _describe(text))
            nested["language"][target] = [[text] * self.horizons["language"]]
        return nested

    def _frames(self, obs: Mapping, openpi_key: str, modality: str, frame_ndim: int, dtype: Any,
                what: str) -> np.ndarray:
        """The value as (1, T, ...): one frame when the config's horizon is 1, else T stacked frames."""
        if openpi_key not in obs:
            raise ValidationError(_WHERE, openpi_key, f"a {what}", f"missing (keys: {sorted(map(str, obs))})")
        value = obs[openpi_key]
        arr = np.asarray(value) if isinstance(value, (list, tuple, np.ndarray, np.generic)) else None
        horizon = self.horizons[modality]
        expected = f"a {what}" if horizon == 1 else f"{horizon} stacked frames, each a {what}"
        if arr is None or (dtype is not None and arr.dtype != dtype):
            raise ValidationError(_WHERE, openpi_key, expected, _describe(value))
        if arr.ndim == frame_ndim and horizon == 1:
            arr = arr[None]
        if arr.ndim != frame_ndim + 1 or arr.shape[0] != horizon:
            raise ValidationError(_WHERE, openpi_key, expected, _describe(value))
        return arr[None]

    def actions_reply(self, action: Any) -> dict[str, np.ndarray]:
        """openpi's action map (``{"actions": (H, D) float32}``) from the policy's batch-of-one action dict."""
        if not isinstance(action, Mapping):
            raise ValidationError("action", None, "a dict of action key -> (1, H, D) array", _describe(action))
        reply = {}
        for openpi_key, targets in self.actions.items():
            parts = []
            for target in targets:
                value = action.get(target)
                if not isinstance(value, np.ndarray) or value.ndim != 3 or value.shape[0] != 1:
                    raise ValidationError("action", target, "a (1, H, D) array in the policy's reply",
                                          "missing" if value is None else _describe(value))
                parts.append(value[0])
            reply[openpi_key] = np.concatenate(parts, axis=-1)
        return reply
