"""When a model's actions diverge from the demo's, per action key (the comparison's action-divergence rule).

The rule: step ``t`` diverges on key ``k`` when, for some dimension of ``k``, the difference (model - replay) at
``t`` exceeds ``threshold`` in magnitude, its running mean from ``t`` stays beyond ``threshold`` on the same
side over each of the next ``window`` steps (``t``, ``t..t+1``, ..., ``t..t+window-1``), and most of those
``window`` steps are beyond it on that side themselves. The key's divergence step is the first such ``t``
(None: never). A model that samples its actions differs from the demo by noise at every step: noise that swings
both ways does not keep its running mean beyond the threshold, one outlier step is not most of the window, a
real departure (the arm heading elsewhere, the gripper closing while the demo's stays open) passes both, and it
is dated at its first step. The last ``window - 1`` steps of a trace cannot start a divergence (too few steps follow to tell it from
noise; a trace shorter than ``window`` is judged over its whole length). With ``window=1`` the rule is the plain
"first step whose difference exceeds the threshold". Keys are judged separately, so a gripper that flips between
-1 and +1 (a difference of 2.0) is reported as the gripper's divergence, not the arm's.

A model's sampling noise can itself exceed any fixed threshold (a small Lift model's two samples at the same
observation differ by up to 0.6 on an arm dimension and by 2.0 on the gripper around the grasp), so the rule
takes a noise reference: ``resamples``, J more actions the model gave at the same observations under other
seeds (not executed). Then the threshold of step ``t`` and dimension ``i`` is ``threshold`` plus the largest
|model - resample| of that dimension over the steps ``t..t+window-1`` and the J resamples: a step diverges only
when the demo stays further from the model than the model's own resamples came, by ``threshold``, over the
window. Where the model is sure (its resamples agree) the rule is the fixed-threshold one; where it is unsure
(the grasp's timing) it takes a larger, sustained departure. Without resamples (J=0), or with a deterministic
model, it is the fixed-threshold rule.
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


def noise_margin(model: np.ndarray, resamples: np.ndarray | None, window: int) -> np.ndarray:
    """Per step and dimension, the largest |model - resample| over the steps ``t..t+window-1`` and the
    resamples ((T, A) model, (T, J, A) resamples; zeros without resamples)."""
    model = np.asarray(model, np.float64)
    if resamples is None or np.size(resamples) == 0:
        return np.zeros_like(model)
    resamples = np.asarray(resamples, np.float64)
    if resamples.ndim != 3 or resamples.shape[0] != model.shape[0] or resamples.shape[2] != model.shape[1]:
        raise ValueError(f"resamples must be (T, J, A) = ({model.shape[0]}, J, {model.shape[1]}), got "
                         f"{resamples.shape}")
    spread = np.abs(resamples - model[:, None, :]).max(axis=1)  # (T, A)
    ahead = np.full((window - 1, spread.shape[1]), 0.0)
    padded = np.concatenate([spread, ahead])
    return np.max(np.stack([padded[k:k + len(spread)] for k in range(window)]), axis=0)


def divergence_steps(model: np.ndarray, replay: np.ndarray, dims: Mapping[str, int], threshold: float,
                     window: int = ACTION_WINDOW, resamples: np.ndarray | None = None) -> dict[str, int | None]:
    """Each action key's divergence step under the module's rule ((T, A) model and replay actions; ``resamples``:
    (T, J, A) actions the model gave at the same observations under other seeds, the noise reference)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    signed = np.asarray(model, np.float64) - np.asarray(replay, np.float64)
    if signed.ndim != 2 or not len(signed):
        return {k: None for k in key_slices(dims, 0)}
    window = min(window, len(signed))
    starts = len(signed) - window + 1  # steps with a full window after them
    limit = threshold + noise_margin(model, resamples, window)[:starts]
    cumulative = np.concatenate([np.zeros((1, signed.shape[1])), np.cumsum(signed, axis=0)])
    side = np.sign(signed[:starts])
    hits = np.abs(signed[:starts]) > limit
    beyond = np.zeros(hits.shape, dtype=np.int64)
    for k in range(1, window + 1):
        running = (cumulative[k:starts + k] - cumulative[:starts]) / k
        hits &= running * side > limit
        beyond += signed[k - 1:starts + k - 1] * side > limit
    hits &= 2 * beyond > window  # most steps of the window, so one outlier step is not a divergence
    result: dict[str, int | None] = {}
    for key, cols in key_slices(dims, signed.shape[1]).items():
        rows = np.flatnonzero(hits[:, cols].any(axis=1))
        result[key] = int(rows[0]) if len(rows) else None
    return result


def first_step(steps: Mapping[str, int | None] | Sequence[int | None]) -> int | None:
    """The earliest of several divergence steps (None when none diverged)."""
    values = [s for s in (steps.values() if isinstance(steps, Mapping) else steps) if s is not None]
    return min(values) if values else None
