"""Per-column statistics in GR00T's ``meta/stats.json`` format (mean, std, min, max, q01, q99)."""

from __future__ import annotations

from typing import Any

import numpy as np

STAT_NAMES = ("mean", "std", "min", "max", "q01", "q99")


def column_stats(values: np.ndarray) -> dict[str, list[float]]:
    """Statistics of one column over its rows: ``values`` is (N,) or (N, D); each stat is a list of length D."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 0 or arr.shape[0] == 0:
        raise ValueError(f"cannot compute statistics of an empty column (shape {arr.shape})")
    arr = arr.reshape(arr.shape[0], -1)
    q01, q99 = np.quantile(arr, [0.01, 0.99], axis=0)
    stats = {
        "mean": arr.mean(axis=0),
        "std": arr.std(axis=0),
        "min": arr.min(axis=0),
        "max": arr.max(axis=0),
        "q01": q01,
        "q99": q99,
    }
    return {name: [float(v) for v in stats[name]] for name in STAT_NAMES}


def compute_stats(columns: dict[str, np.ndarray]) -> dict[str, Any]:
    """``{column: column_stats(values)}`` for every numeric column given."""
    return {name: column_stats(values) for name, values in columns.items()}
