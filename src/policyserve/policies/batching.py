"""Merge requests' observations into one batch along axis 0 and split the actions back.

Works on any nesting of dicts (GR00T's nested ``video``/``state``/``language`` format and the flat
``video.<k>`` sim format alike): arrays are concatenated, lists (language) joined.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def batch_size_of(observation: Any) -> int:
    """Batch size of an observation: the length of its first array or list, depth first."""
    if isinstance(observation, np.ndarray):
        return len(observation)
    if isinstance(observation, (list, tuple)):
        return len(observation)
    if isinstance(observation, dict):
        for value in observation.values():
            if isinstance(value, (dict, np.ndarray, list, tuple)):
                try:
                    return batch_size_of(value)
                except ValueError:
                    continue
    raise ValueError("observation has no array or list entries to take a batch size from")


def layout_key(observation: Any) -> Any:
    """Equal for observations that can be merged: same keys, leaf kinds, trailing shapes and dtypes.

    Anything without a batch axis (scalars, strings) gives a key equal to no other, so such requests
    are served one by one.
    """
    if isinstance(observation, dict):
        return tuple((key, layout_key(value)) for key, value in observation.items())
    if isinstance(observation, np.ndarray) and observation.ndim >= 1:
        return ("array", observation.shape[1:], observation.dtype.str)
    if isinstance(observation, (list, tuple)):
        return "list"
    return object()


def can_merge(observations: list[Any]) -> bool:
    """True when all observations share one :func:`layout_key`."""
    first = layout_key(observations[0])
    return all(layout_key(other) == first for other in observations[1:])


def merge_observations(observations: list[Any]) -> tuple[Any, list[int]]:
    """Concatenate observations (see :func:`can_merge`); returns (merged, per-request batch sizes)."""
    return _merge(observations), [batch_size_of(obs) for obs in observations]


def _merge(parts: list[Any]) -> Any:
    first = parts[0]
    if isinstance(first, dict):
        return {key: _merge([part[key] for part in parts]) for key in first}
    if isinstance(first, np.ndarray):
        return np.concatenate(parts, axis=0)
    return [item for part in parts for item in part]


def split_rows(value: Any, sizes: list[int]) -> list[Any]:
    """Undo :func:`merge_observations` on an action (any nesting of dicts of arrays or lists)."""
    bounds = np.cumsum([0, *sizes])
    return [_slice(value, int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]


def _slice(value: Any, lo: int, hi: int) -> Any:
    if isinstance(value, dict):
        return {key: _slice(item, lo, hi) for key, item in value.items()}
    return value[lo:hi]
