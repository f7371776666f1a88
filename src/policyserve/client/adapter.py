"""Env <-> policy adapter: env observation dicts to the nested policy format and action dicts back to env vectors.

The policy side is described by its modality config (video, state and language keys with their
``delta_indices``); the env side by the keys of its observation dict. A :class:`~policyserve.client.keymap.KeyMap`
says which env key (or slice of an env vector) feeds which policy key, env key -> policy key (default for
policyserve's Franka envs: ``table_cam -> ego_view``, ``wrist_cam -> wrist_view``, state keys by the same name,
language from the env's ``task`` text).

History: when a modality's ``delta_indices`` span more than the current step (e.g. ``[-2, -1, 0]``), the
adapter keeps the last frames of each env and sends real past frames; at the start of an episode, before
enough frames exist, the earliest frame of the episode is repeated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError, ValidationError
from ..registry import parse_modality_configs
from ..types import ModalityConfigs
from .keymap import KeyMap

def to_numpy(value: Any) -> np.ndarray:
    """A numpy view/copy of ``value`` (numpy array, torch tensor on any device, list or scalar)."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor without importing torch
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _describe_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)}"
    return type(value).__name__


class HistoryBuffer:
    """Last frames of one observation key for every env, to serve ``delta_indices`` like ``[-2, -1, 0]``.

    Frames are kept batched, ``(length, n_envs, ...)``: a batched observation is written for many envs at once
    and :meth:`get_all` gathers every env's frames in one indexing step (no per-env split and re-stack).
    """

    def __init__(self, n_envs: int, delta_indices: Sequence[int]) -> None:
        if any(d > 0 for d in delta_indices):
            raise ConfigError(f"observation delta_indices must be <= 0 (past or current frames), got {list(delta_indices)}")
        self.delta_indices = list(delta_indices)
        self.length = 1 - min(self.delta_indices)
        self.n_envs = n_envs
        self._frames: np.ndarray | None = None
        self._newest = np.full(n_envs, -1, dtype=np.int64)
        self._count = np.zeros(n_envs, dtype=np.int64)
        """Frames recorded per env since its last clear (at most ``length`` are kept)."""

    def push(self, env_id: int, frame: np.ndarray) -> None:
        """Record ``frame`` as env ``env_id``'s newest."""
        self.push_rows([env_id], frame[None])

    def push_rows(self, env_ids: Sequence[int], rows: np.ndarray) -> None:
        """Record ``rows[j]`` as env ``env_ids[j]``'s newest frame."""
        ids = np.asarray(env_ids, dtype=np.int64)
        if self._frames is None or self._frames.shape[2:] != rows.shape[1:] or self._frames.dtype != rows.dtype:
            if self._frames is not None and self._count.any():
                raise ValueError(f"frame shape {rows.shape[1:]} {rows.dtype} differs from the recorded "
                                 f"{self._frames.shape[2:]} {self._frames.dtype}")
            self._frames = np.empty((self.length, self.n_envs, *rows.shape[1:]), dtype=rows.dtype)
        self._newest[ids] = (self._newest[ids] + 1) % self.length
        self._count[ids] = np.minimum(self._count[ids] + 1, self.length)
        self._frames[self._newest[ids], ids] = rows

    def clear(self, env_id: int) -> None:
        """Forget env ``env_id``'s frames."""
        self._count[env_id] = 0

    def get(self, env_id: int) -> np.ndarray:
        """Frames at ``delta_indices`` relative to the newest, stacked to (T, ...); early steps repeat the first."""
        return self._gather([env_id])[0]

    def get_all(self) -> np.ndarray:
        """:meth:`get` of every env: (n_envs, T, ...)."""
        return self._gather(list(range(self.n_envs)))

    def _gather(self, env_ids: list[int]) -> np.ndarray:
        ids = np.asarray(env_ids, dtype=np.int64)
        empty = [int(i) for i in ids if self._count[i] == 0]
        if empty or self._frames is None:
            raise RuntimeError(f"no observation recorded yet for env {empty[0] if empty else env_ids[0]}")
        ages = np.minimum(-np.asarray(self.delta_indices)[None, :], self._count[ids][:, None] - 1)
        slots = (self._newest[ids][:, None] - ages) % self.length
        return self._frames[slots, ids[:, None]]


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
        self.resolved = self.key_map.resolve(self.configs)
        self.video_keys = list(self.configs["video"].modality_keys)
        self.state_keys = list(self.configs["state"].modality_keys)
        self.action_keys = list(self.configs["action"].modality_keys)
        self.language_key = self.resolved.language_key
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
        return self.resolved.required_env_keys()

    def check_env_observation(self, obs: Mapping[str, Any]) -> None:
        """Raise :class:`ValidationError` listing every policy key whose env key is missing from ``obs``."""
        self.resolved.check(obs)

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
            source = self.resolved.sources[(modality, key)]
            env_key = source.text
            value = to_numpy(obs[source.key])
            if env_id is None and (value.ndim == 0 or value.shape[0] != self.n_envs):
                raise ValidationError(modality, key, f"batched env value with leading axis {self.n_envs} "
                                      f"(from env key {env_key!r})", f"shape {value.shape}")
            rows = source.take(value[None] if env_id is not None else value[np.asarray(ids, dtype=np.int64)])
            buffer.push_rows(ids, self._cast(modality, key, env_key, rows))
        if self.language_key is not None:
            for i in ids:
                self._text[i] = self._instruction(obs, None if env_id is not None else i)

    def _cast(self, modality: str, key: str, env_key: str, rows: np.ndarray) -> np.ndarray:
        """Frames ``rows`` (one per env) as the policy wants them: uint8 images, float32 state vectors."""
        if modality == "video":
            if rows.ndim != 4 or rows.shape[-1] != 3:
                raise ValidationError(modality, key, f"an (H, W, 3) image from env key {env_key!r}",
                                      f"shape {rows.shape[1:]}")
            if rows.dtype != np.uint8:
                if np.issubdtype(rows.dtype, np.floating):  # images in [0, 1] are scaled, frame by frame
                    unit = rows.reshape(len(rows), -1).max(axis=1, initial=-np.inf) <= 1.0
                    rows = np.where(unit[:, None, None, None], rows * 255.0, rows)
                rows = np.clip(rows, 0, 255).astype(np.uint8)
            return np.ascontiguousarray(rows)
        if rows.ndim > 2:
            raise ValidationError(modality, key, f"a 1-D state vector from env key {env_key!r}",
                                  f"shape {rows.shape[1:]}")
        return np.asarray(rows, dtype=np.float32).reshape(len(rows), -1)

    def _instruction(self, obs: Mapping[str, Any], index: int | None) -> str:
        if self.key_map.instruction is not None:
            return self.key_map.instruction
        text = obs[self.key_map.language]
        if index is not None and not isinstance(text, (str, bytes)):
            if not isinstance(text, (list, tuple)) or len(text) != self.n_envs:
                raise ValidationError("language", self.language_key, f"one str per env ({self.n_envs}) or one str "
                                      f"for all from env key {self.key_map.language!r}", _describe_text(text))
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
            observation[modality][key] = buffer.get_all()
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
