"""Per-column statistics: GR00T's ``meta/stats.json`` format (mean, std, min, max, q01, q99) plus LeRobot's ``count``.

Numeric columns get one value per dimension. Video features get LeRobot's image statistics: one value per colour
channel on the [0, 1] scale, shaped (3, 1, 1) (nested lists ``[[[r]], [[g]], [[b]]]``), computed exactly from a
256-bin histogram of the uint8 frames so that episode histograms add up to the dataset's.
"""

from __future__ import annotations

from typing import Any

import numpy as np

STAT_NAMES = ("mean", "std", "min", "max", "q01", "q99")
_QUANTILES = {"q01": 0.01, "q99": 0.99}


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
    """``{column: column_stats(values) + count}`` for every numeric column given."""
    return {name: {**column_stats(values), "count": [len(values)]} for name, values in columns.items()}


def channel_histogram(frames: np.ndarray) -> np.ndarray:
    """(3, 256) counts of each uint8 value per colour channel of ``frames`` (N, H, W, 3)."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"image statistics need uint8 (N, H, W, 3) frames, got {frames.dtype} {frames.shape}")
    flat = frames.reshape(-1, 3)
    return np.stack([np.bincount(flat[:, c], minlength=256) for c in range(3)]).astype(np.int64)


def histogram_stats(histogram: np.ndarray, num_frames: int) -> dict[str, Any]:
    """LeRobot image statistics of a (3, 256) channel histogram: per-channel (3, 1, 1) values in [0, 1], count."""
    histogram = np.asarray(histogram, dtype=np.float64)
    if histogram.shape != (3, 256) or num_frames < 1 or histogram.sum(axis=1).min() <= 0:
        raise ValueError(f"need a non-empty (3, 256) histogram of >= 1 frame, got {histogram.shape}, {num_frames}")
    levels = np.arange(256, dtype=np.float64) / 255.0
    total = histogram.sum(axis=1)
    mean = histogram @ levels / total
    std = np.sqrt(np.maximum(histogram @ levels**2 / total - mean**2, 0.0))
    seen = histogram > 0
    cumulative = np.cumsum(histogram, axis=1) / total[:, None]
    stats = {
        "mean": mean,
        "std": std,
        "min": levels[seen.argmax(axis=1)],
        "max": levels[255 - seen[:, ::-1].argmax(axis=1)],
        **{name: levels[(cumulative < q).sum(axis=1)] for name, q in _QUANTILES.items()},
    }
    out: dict[str, Any] = {name: [[[float(v)]] for v in stats[name]] for name in STAT_NAMES}
    out["count"] = [int(num_frames)]
    return out
