"""Merge observations from several requests into one batch and split the actions back."""

from __future__ import annotations

from typing import Any

import numpy as np


def batch_size_of(observation: dict[str, Any]) -> int:
    """Batch size of a nested observation (first array or language list found)."""
    for modality in ("video", "state", "language"):
        group = observation.get(modality) if isinstance(observation, dict) else None
        if isinstance(group, dict):
            for value in group.values():
                return len(value)
    raise ValueError("observation has no video, state or language entries to take a batch size from")


def merge_observations(observations: list[dict[str, Any]]) -> tuple[dict[str, Any], list[int]]:
    """Concatenate nested observations along the batch axis; returns (merged, per-request sizes)."""
    sizes = [batch_size_of(obs) for obs in observations]
    merged: dict[str, Any] = {}
    for modality, group in observations[0].items():
        if not isinstance(group, dict):
            merged[modality] = group
            continue
        merged[modality] = {}
        for key, first in group.items():
            parts = [obs[modality][key] for obs in observations]
            if isinstance(first, np.ndarray):
                merged[modality][key] = np.concatenate(parts, axis=0)
            else:
                merged[modality][key] = [item for part in parts for item in part]
    return merged, sizes


def split_actions(action: dict[str, Any], sizes: list[int]) -> list[dict[str, Any]]:
    """Undo :func:`merge_observations` on the action dict."""
    bounds = np.cumsum([0, *sizes])
    return [{key: value[lo:hi] for key, value in action.items()} for lo, hi in zip(bounds[:-1], bounds[1:])]


def can_merge(observations: list[dict[str, Any]]) -> bool:
    """True when all observations have the same keys and per-key trailing shapes."""
    first = observations[0]
    for obs in observations[1:]:
        if obs.keys() != first.keys():
            return False
        for modality, group in first.items():
            other = obs[modality]
            if isinstance(group, dict) != isinstance(other, dict):
                return False
            if not isinstance(group, dict):
                continue
            if group.keys() != other.keys():
                return False
            for key, value in group.items():
                if isinstance(value, np.ndarray):
                    if not isinstance(other[key], np.ndarray) or value.shape[1:] != other[key].shape[1:] \
                            or value.dtype != other[key].dtype:
                        return False
    return True
