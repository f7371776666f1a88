"""When a model's actions diverge from the demo's, per action key (the comparison's action-divergence rule).

The rule: step ``t`` diverges on key ``k`` when, for some dimension of ``k``, the difference (model - replay) at
``t`` exceeds ``threshold`` in magnitude and its running mean from ``t`` stays beyond ``threshold`` on the same
side over each of the next ``window`` steps (``t``, ``t..t+1``, ..., ``t..t+window-1``). The key's divergence
step is the first such ``t`` (None: never). A model that samples its actions differs from the demo by noise at
every step: noise that swings both ways (and is below the threshold) does not keep its running mean beyond the
threshold (noise above it does: ``benchmarks/divergence_noise.py`` measures a model's own), a real departure
(the arm heading elsewhere, the gripper closing while the demo's stays open) does, and it is dated at its first
step. The last ``window - 1`` steps of a trace cannot start a divergence (too few steps follow to tell it from
noise; a trace shorter than ``window`` is judged over its whole length). With ``window=1`` the rule is the plain
"first step whose difference exceeds the threshold". Keys are judged separately, so a gripper that flips between
-1 and +1 (a difference of 2.0) is reported as the gripper's divergence, not the arm's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

ACTION_WINDOW = 5
"""Default number of steps the mean difference is taken over."""


def key_slices(dims: Mapping[str, int], width: int) -> dict[str, slice]:
    """Columns of each action key in the env action vector (keys in order); ``{"all": ...}`` without dims."""
    if not dims:
        return {"all": slice(0, width)}
    slices, offset = {}, 0
    for key, dim in dims.items():
        slices[key] = slice(offset, offset + int(dim))
        offset += int(dim)
    return slices


def max_diff_per_key(model: np.ndarray, replay: np.ndarray, dims: Mapping[str, int]) -> dict[str, float]:
    """Largest |model - replay| over the steps and dimensions of each action key ((T, A) actions)."""
    diff = np.abs(np.asarray(model, np.float64) - np.asarray(replay, np.float64))
    return {k: float(diff[:, s].max()) if diff.size else 0.0
            for k, s in key_slices(dims, diff.shape[1] if diff.ndim == 2 else 0).items()}


def divergence_steps(model: np.ndarray, replay: np.ndarray, dims: Mapping[str, int], threshold: float,
                     window: int = ACTION_WINDOW) -> dict[str, int | None]:
    """Each action key's divergence step under the module's rule ((T, A) model and replay actions)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    signed = np.asarray(model, np.float64) - np.asarray(replay, np.float64)
    if signed.ndim != 2 or not len(signed):
        return {k: None for k in key_slices(dims, 0)}
    window = min(window, len(signed))
    starts = len(signed) - window + 1  # steps with a full window after them
    cumulative = np.concatenate([np.zeros((1, signed.shape[1])), np.cumsum(signed, axis=0)])
    side = np.sign(signed[:starts])
    hits = np.abs(signed[:starts]) > threshold
    for k in range(2, window + 1):
        running = (cumulative[k:starts + k] - cumulative[:starts]) / k
        hits &= running * side > threshold
    result: dict[str, int | None] = {}
    for key, cols in key_slices(dims, signed.shape[1]).items():
        rows = np.flatnonzero(hits[:, cols].any(axis=1))
        result[key] = int(rows[0]) if len(rows) else None
    return result


def first_step(steps: Mapping[str, int | None] | Sequence[int | None]) -> int | None:
    """The earliest of several divergence steps (None when none diverged)."""
    values = [s for s in (steps.values() if isinstance(steps, Mapping) else steps) if s is not None]
    return min(values) if values else None
