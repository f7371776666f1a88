"""Per-key normalization of states and actions: min-max to [-1, 1] by default, mean/std on request."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError

MIN_MAX = "min_max"
MEAN_STD = "mean_std"
_EPS = 1e-6


@dataclass
class KeyStats:
    """Statistics of one key and the mode used to normalize it."""

    mode: str
    min: np.ndarray
    max: np.ndarray
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def from_array(cls, values: np.ndarray, mode: str = MIN_MAX) -> KeyStats:
        """Stats of ``values`` shaped (N, D)."""
        if mode not in (MIN_MAX, MEAN_STD):
            raise ConfigError(f"unknown normalization mode {mode!r}; expected {MIN_MAX!r} or {MEAN_STD!r}")
        values = np.asarray(values, dtype=np.float64).reshape(-1, np.shape(values)[-1])
        if values.shape[0] == 0:
            raise ConfigError("cannot compute normalization statistics from zero samples")
        return cls(mode, values.min(0), values.max(0), values.mean(0), values.std(0))

    def _scale_offset(self) -> tuple[np.ndarray, np.ndarray]:
        if self.mode == MEAN_STD:
            return np.where(self.std < _EPS, 1.0, self.std), self.mean
        half = (self.max - self.min) / 2.0
        # A dimension that never varies maps to 0 around its constant value instead of dividing by 0.
        return np.where(half < _EPS, 1.0, half), (self.max + self.min) / 2.0

    def normalize(self, x: np.ndarray) -> np.ndarray:
        scale, offset = self._scale_offset()
        return ((np.asarray(x, dtype=np.float64) - offset) / scale).astype(np.float32)

    def unnormalize(self, y: np.ndarray) -> np.ndarray:
        scale, offset = self._scale_offset()
        y = np.asarray(y, dtype=np.float64)
        if self.mode == MIN_MAX:
            y = np.clip(y, -1.0, 1.0)
        return (y * scale + offset).astype(np.float32)

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, **{k: getattr(self, k).tolist() for k in ("min", "max", "mean", "std")}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> KeyStats:
        try:
            arrays = {k: np.asarray(data[k], dtype=np.float64) for k in ("min", "max", "mean", "std")}
            return cls(str(data["mode"]), **arrays)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"invalid normalization statistics entry: {exc}") from exc


class Normalizer:
    """``{modality: {key: KeyStats}}`` for the "state" and "action" modalities."""

    def __init__(self, stats: Mapping[str, Mapping[str, KeyStats]]):
        self.stats = {m: dict(keys) for m, keys in stats.items()}

    @classmethod
    def fit(
        cls,
        arrays: Mapping[str, Mapping[str, np.ndarray]],
        mean_std_keys: Mapping[str, Iterable[str] | None] | None = None,
    ) -> Normalizer:
        """Statistics of ``{modality: {key: (N, D) array}}``; keys in ``mean_std_keys[modality]`` use mean/std."""
        mean_std_keys = mean_std_keys or {}
        stats: dict[str, dict[str, KeyStats]] = {}
        for modality, keys in arrays.items():
            chosen = set(mean_std_keys.get(modality) or [])
            stats[modality] = {k: KeyStats.from_array(v, MEAN_STD if k in chosen else MIN_MAX) for k, v in keys.items()}
        return cls(stats)

    def _get(self, modality: str, key: str) -> KeyStats:
        try:
            return self.stats[modality][key]
        except KeyError:
            raise ConfigError(f"no normalization statistics for {modality}[{key!r}]") from None

    def normalize(self, modality: str, key: str, x: np.ndarray) -> np.ndarray:
        """Physical units -> normalized float32."""
        return self._get(modality, key).normalize(x)

    def unnormalize(self, modality: str, key: str, y: np.ndarray) -> np.ndarray:
        """Normalized -> physical units (min-max keys are clipped to [-1, 1] first)."""
        return self._get(modality, key).unnormalize(y)

    def to_json(self) -> dict[str, Any]:
        return {m: {k: s.to_json() for k, s in keys.items()} for m, keys in self.stats.items()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Normalizer:
        if not isinstance(data, Mapping):
            raise ConfigError("normalization statistics must be a JSON object")
        return cls({m: {k: KeyStats.from_json(s) for k, s in keys.items()} for m, keys in data.items()})
