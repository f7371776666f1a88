"""Env <-> policy adapter: env observation dicts to the nested policy format and action dicts back to env vectors.

The policy side is described by its modality config (video, state and language keys with their
``delta_indices``); the env side by the keys of its observation dict. A :class:`KeyMap` says which env key
feeds which policy key (default for policyserve's Franka envs: ``table_cam -> ego_view``,
``wrist_cam -> wrist_view``, state keys by the same name, language from the env's ``task`` text).

History: when a modality's ``delta_indices`` span more than the current step (e.g. ``[-2, -1, 0]``), the
adapter keeps the last frames of each env and sends real past frames; at the start of an episode, before
enough frames exist, the earliest frame of the episode is repeated.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, ValidationError
from ..jsonio import read_json_object
from ..registry import parse_modality_configs
from ..types import ModalityConfigs

DEFAULT_VIDEO_MAP: dict[str, str] = {"ego_view": "table_cam", "wrist_view": "wrist_cam"}
"""Policy video key -> env camera key for policyserve's Franka envs."""

DEFAULT_LANGUAGE_KEY = "task"


def to_numpy(value: Any) -> np.ndarray:
    """A numpy view/copy of ``value`` (numpy array, torch tensor on any device, list or scalar)."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor without importing torch
        return value.detach().cpu().numpy()
    return np.asarray(value)


@dataclass
class KeyMap:
    """Which env observation key feeds which policy key.

    ``video`` and ``state`` map policy key -> env key; policy keys not listed use the env key of the same
    name. ``language`` is the env key holding the instruction text; ``instruction``, when set, overrides it.
    """

    video: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_VIDEO_MAP))
    state: dict[str, str] = field(default_factory=dict)
    language: str = DEFAULT_LANGUAGE_KEY
    instruction: str | None = None

    def env_key(self, modality: str, policy_key: str) -> str:
        """Env observation key that feeds ``modality``/``policy_key``."""
        table = {"video": self.video, "state": self.state}[modality]
        return table.get(policy_key, policy_key)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "key map") -> KeyMap:
        """Build from ``{"video": {policy: env}, "state": {...}, "language": "task", "instruction": "..."}``."""
        unknown = set(data) - {"video", "state", "language", "instruction"}
        if unknown:
            raise ConfigError(f"{source}: unknown entries {sorted(unknown)}; expected video, state, language, "
                              "instruction")
        for group in ("video", "state"):
            if group in data and not isinstance(data[group], Mapping):
                raise ConfigError(f"{source}: {group!r} must map policy key -> env key, got {data[group]!r}")
        base = cls()
        return cls(
            video={**base.video, **dict(data.get("video", {}))},
            state=dict(data.get("state", {})),
            language=str(data.get("language", DEFAULT_LANGUAGE_KEY)),
            instruction=data.get("instruction"),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> KeyMap:
        """Read a JSON key map file (see :meth:`from_dict`)."""
        return cls.from_dict(read_json_object(path, "key map"), str(path))

    @classmethod
    def from_pairs(cls, pairs: Sequence[str], base: KeyMap | None = None) -> KeyMap:
        """Apply ``video.POLICY=ENV`` / ``state.POLICY=ENV`` / ``language=ENV`` flags on top of ``base``."""
        result = base or cls()
        result = cls(dict(result.video), dict(result.state), result.language, result.instruction)
        for pair in pairs:
            lhs, sep, rhs = pair.partition("=")
            group, dot, key = lhs.partition(".")
            if not sep or not rhs:
                raise ConfigError(f"key map entry {pair!r}: expected video.POLICY=ENV, state.POLICY=ENV or language=ENV")
            if group == "language" and not dot:
                result.language = rhs
            elif group in ("video", "state") and key:
                getattr(result, group)[key] = rhs
            else:
                raise ConfigError(f"key map entry {pair!r}: expected video.POLICY=ENV, state.POLICY=ENV or language=ENV")
        return result


class HistoryBuffer:
    """Last frames of one observation key for each env, to serve ``delta_indices`` like ``[-2, -1, 0]``."""

    def __init__(self, n_envs: int, delta_indices: Sequence[int]) -> None:
        if any(d > 0 for d in delta_indices):
            raise ConfigError(f"observation delta_indices must be <= 0 (past or current frames), got {list(delta_indices)}")
        self.delta_indices = list(delta_indices)
        self.length = 1 - min(self.delta_indices)
        self._frames: list[deque[np.ndarray]] = [deque(maxlen=self.length) for _ in range(n_envs)]

    def push(self, env_id: int, frame: np.ndarray) -> None:
        self._frames[env_id].append(frame)

    def clear(self, env_id: int) -> None:
        self._frames[env_id].clear()

    def get(self, env_id: int) -> np.ndarray:
        """Frames at ``delta_indices`` relative to the newest, stacked to (T, ...); early steps repeat the first."""
        frames = self._frames[env_id]
        if not frames:
            raise RuntimeError(f"no observation recorded yet for env {env_id}")
        newest = len(frames) - 1
        return np.stack([frames[max(0, newest + d)] for d in self.delta_indices])


class EnvPolicyAdapter:
    """Maps env observations to the policy's nested batch and the policy's action chunks to env actions.

    ``n_envs`` envs share one adapter; every policy query is one batch over all of them. Use
    :meth:`push` after every env reset/step (per env, or for all envs with a batched dict), :meth:`reset`
    when an env starts a new episode, :meth:`build` to make the request, and :meth:`to_env_actions` on the
    reply. ``adapter(obs)`` does push + build for all envs at once (vectorised envs such as IsaacLab's).
    """

    def __init__(
        self,
        modality_configs: ModalityConfigs | Mapping[str, Any],
        n_envs: int,
        key_map: KeyMap | None = None,
    ) -> None:
        if n_envs < 1:
            raise ConfigError(f"n_envs must be >= 1, got {n_envs}")
        self.configs: ModalityConfigs = parse_modality_configs(dict(modality_configs), "policy modality config")
        self.n_envs = n_envs
        self.key_map = key_map or KeyMap()
        self.video_keys = list(self.configs["video"].modality_keys)
        self.state_keys = list(self.configs["state"].modality_keys)
        self.action_keys = list(self.configs["action"].modality_keys)
        language_keys = list(self.configs["language"].modality_keys)
        if len(language_keys) > 1:
            raise ConfigError(f"the adapter supports one language key, the policy asks for {language_keys}")
        self.language_key = language_keys[0] if language_keys else None
        self.language_horizon = self.configs["language"].horizon
        self._history: dict[tuple[str, str], HistoryBuffer] = {}
        for modality in ("video", "state"):
            for key in self.configs[modality].modality_keys:
                self._history[(modality, key)] = HistoryBuffer(n_envs, self.configs[modality].delta_indices)
        self._text: list[str] = [""] * n_envs
        self.action_dims: dict[str, int] | None = None

    # ------------------------------------------------------------------ observations
    def required_env_keys(self) -> dict[str, str]:
        """``"<modality>.<policy key>" -> env key`` for every key the policy needs from the env."""
        needed = {f"{m}.{k}": self.key_map.env_key(m, k) for (m, k) in self._history}
        if self.language_key is not None and self.key_map.instruction is None:
            needed[f"language.{self.language_key}"] = self.key_map.language
        return needed

    def check_env_observation(self, obs: Mapping[str, Any]) -> None:
        """Raise :class:`ValidationError` naming the first policy key whose env key is missing from ``obs``."""
        for target, env_key in self.required_env_keys().items():
            if env_key not in obs:
                modality, _, key = target.partition(".")
                raise ValidationError(
                    modality, key, f"env observation key {env_key!r} (key map: {env_key} -> {key})",
                    f"env keys {sorted(obs)}", "missing in the env observation;",
                )

    def reset(self, env_ids: Sequence[int] | None = None) -> None:
        """Forget the history of ``env_ids`` (all envs when None): they start new episodes."""
        for env_id in range(self.n_envs) if env_ids is None else env_ids:
            for buffer in self._history.values():
                buffer.clear(int(env_id))

    def push(self, obs: Mapping[str, Any], env_id: int | None = None, *,
             env_ids: Sequence[int] | None = None) -> None:
        """Record one observation: of env ``env_id`` (unbatched arrays), or of all envs (leading batch axis).

        With a batched ``obs``, ``env_ids`` limits the recording to those envs (the others keep their history).
        """
        self.check_env_observation(obs)
        ids: Sequence[int] = [env_id] if env_id is not None else range(self.n_envs) if env_ids is None else env_ids
        for (modality, key), buffer in self._history.items():
            env_key = self.key_map.env_key(modality, key)
            value = to_numpy(obs[env_key])
            if env_id is None and (value.ndim == 0 or value.shape[0] != self.n_envs):
                raise ValidationError(modality, key, f"batched env value with leading axis {self.n_envs} "
                                      f"(from env key {env_key!r})", f"shape {value.shape}")
            for i in ids:
                frame = value if env_id is not None else value[i]
                buffer.push(i, self._cast(modality, key, env_key, frame))
        if self.language_key is not None:
            for i in ids:
                self._text[i] = self._instruction(obs, None if env_id is not None else i)

    def _cast(self, modality: str, key: str, env_key: str, frame: np.ndarray) -> np.ndarray:
        if modality == "video":
            if frame.ndim != 3 or frame.shape[-1] != 3:
                raise ValidationError(modality, key, f"an (H, W, 3) image from env key {env_key!r}",
                                      f"shape {frame.shape}")
            if frame.dtype != np.uint8:
                frame = np.clip(frame * 255.0 if np.issubdtype(frame.dtype, np.floating) and frame.max() <= 1.0
                                else frame, 0, 255).astype(np.uint8)
            return np.ascontiguousarray(frame)
        if frame.ndim > 1:
            raise ValidationError(modality, key, f"a 1-D state vector from env key {env_key!r}", f"shape {frame.shape}")
        return np.asarray(frame, dtype=np.float32).reshape(-1).copy()

    def _instruction(self, obs: Mapping[str, Any], index: int | None) -> str:
        if self.key_map.instruction is not None:
            return self.key_map.instruction
        text = obs[self.key_map.language]
        if index is not None and not isinstance(text, str):
            text = text[index]
        if isinstance(text, bytes):
            text = text.decode()
        if not isinstance(text, str):
            raise ValidationError("language", self.language_key, f"str from env key {self.key_map.language!r}",
                                  f"{type(text).__name__}")
        return text

    def build(self) -> dict[str, Any]:
        """The nested observation ``{video: (B,T,H,W,3) uint8, state: (B,T,D) float32, language: [[str]]*B}``."""
        observation: dict[str, Any] = {"video": {}, "state": {}, "language": {}}
        for (modality, key), buffer in self._history.items():
            observation[modality][key] = np.stack([buffer.get(i) for i in range(self.n_envs)])
        if self.language_key is not None:
            observation["language"][self.language_key] = [[t] * self.language_horizon for t in self._text]
        return observation

    def __call__(self, obs: Mapping[str, Any]) -> dict[str, Any]:
        """Push a batched observation of all envs and return the request."""
        self.push(obs)
        return self.build()

    # ------------------------------------------------------------------ actions
    def to_env_actions(self, action: Mapping[str, Any], env_action_dim: int | None = None) -> np.ndarray:
        """Concatenate the action keys in modality-config order: float32 (B, H, D_total).

        Accepts bare keys or GR00T sim-wrapper ``action.<key>`` keys; raises :class:`ValidationError` naming a
        missing key, a wrong batch size, mismatched horizons or a total dimension that is not ``env_action_dim``.
        """
        if not isinstance(action, Mapping):
            raise ValidationError("action", None, "a dict of key -> (B, T, D) array", type(action).__name__)
        parts = []
        for key in self.action_keys:
            value = action.get(key, action.get(f"action.{key}"))
            if value is None:
                raise ValidationError("action", key, f"key present in the policy reply (have {sorted(action)})",
                                      "missing", "missing")
            arr = to_numpy(value)
            if arr.ndim == 2:  # (B, D): a single step
                arr = arr[:, None]
            if arr.ndim != 3 or arr.shape[0] != self.n_envs:
                raise ValidationError("action", key, f"(B={self.n_envs}, T, D) array", f"shape {arr.shape}")
            if parts and arr.shape[1] != parts[0].shape[1]:
                raise ValidationError("action", key, f"horizon T={parts[0].shape[1]} like {self.action_keys[0]!r}",
                                      f"T={arr.shape[1]}")
            parts.append(arr.astype(np.float32, copy=False))
        self.action_dims = {k: p.shape[2] for k, p in zip(self.action_keys, parts)}
        chunk = np.concatenate(parts, axis=2)
        if env_action_dim is not None and chunk.shape[2] != env_action_dim:
            layout = " + ".join(f"{k}({d})" for k, d in self.action_dims.items())
            raise ValidationError("action", None, f"total dimension {env_action_dim} (the env's action size)",
                                  f"{layout} = {chunk.shape[2]}", "keys concatenated in modality-config order:")
        return chunk
