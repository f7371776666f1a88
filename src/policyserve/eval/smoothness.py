"""Smoothness of executed actions: jerk at action-chunk boundaries and inside chunks.

The jerk at step t is the L2 norm of the executed actions' second difference,
``||a[t+1] - 2 a[t] + a[t-1]||``. A step is a *boundary* step when its three actions do not all come from
the same source (one policy reply, or one stretch of holding still while waiting for a reply), an
*inner* step otherwise. ``J_B`` and ``J_I`` are the means over an episode's boundary and inner steps; a
client that jumps at chunk boundaries has ``J_B / J_I`` well above 1.

Steps before the episode's first reply (the robot at rest while its first query is answered, the same in
every execution mode with an inference delay) are not counted: the start from rest is not a boundary between
two chunks. Holding still later in the episode (sync waiting for a reply) is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Smoothness:
    """One episode's jerk at chunk boundaries (``boundary``, J_B) and inside chunks (``inner``, J_I).

    NaN where the episode has no step of that kind.
    """

    boundary: float
    inner: float

    @property
    def ratio(self) -> float:
        """J_B / J_I (NaN when either is missing or J_I is 0)."""
        if math.isnan(self.boundary) or math.isnan(self.inner) or self.inner == 0:
            return math.nan
        return self.boundary / self.inner

    def to_json(self) -> dict[str, float | None]:
        """``{"jerk_boundary", "jerk_inner", "jerk_ratio"}`` with None for NaN (JSON has no NaN)."""
        values = {"jerk_boundary": self.boundary, "jerk_inner": self.inner, "jerk_ratio": self.ratio}
        return {k: None if math.isnan(v) else round(float(v), 6) for k, v in values.items()}


def smoothness(actions: np.ndarray | Sequence[np.ndarray], sources: Sequence[int]) -> Smoothness:
    """J_B and J_I of executed ``actions`` (T, D), where ``sources[t]`` identifies what produced action t
    (a reply's number, >= 0, or a negative number for a stretch of holding still)."""
    actions = np.asarray(actions, dtype=np.float64)
    src = np.asarray(sources)
    if actions.ndim != 2 or len(src) != len(actions):
        raise ValueError(f"actions must be (T, D) with one source per step; got {actions.shape} and {len(src)} "
                         "sources")
    if len(actions) < 3:
        return Smoothness(math.nan, math.nan)
    jerk = np.linalg.norm(actions[2:] - 2 * actions[1:-1] + actions[:-2], axis=1)
    inner = (src[:-2] == src[1:-1]) & (src[1:-1] == src[2:])
    replied = np.flatnonzero(src >= 0)
    counted = np.arange(len(jerk)) >= (replied[0] if len(replied) else len(src))  # from the first reply on
    return Smoothness(_mean(jerk[counted & ~inner]), _mean(jerk[counted & inner]))


def _mean(values: np.ndarray | list[float]) -> float:
    values = [v for v in np.asarray(values, dtype=np.float64).tolist() if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def mean_smoothness(episodes: Sequence[Smoothness]) -> Smoothness:
    """Mean J_B and J_I over episodes (each ignoring the episodes without that kind of step)."""
    return Smoothness(_mean([e.boundary for e in episodes]), _mean([e.inner for e in episodes]))
