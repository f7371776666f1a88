"""Strict checks of observations and actions against a policy's modality configs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import ValidationError
from ..types import ModalityConfig, ModalityConfigs, ModalityDims

OBSERVATION_MODALITIES = ("video", "state", "language")


def action_horizon(config: ModalityConfig) -> int:
    """Chunk length an action config asks for; kept for older callers: use :attr:`ModalityConfig.span`."""
    return config.span


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"ndarray shape={value.shape} dtype={value.dtype}"
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


class _BatchTracker:
    """Remembers the first batch size seen and checks every later key against it."""

    def __init__(self, expected: int | None = None) -> None:
        self.size, self.first = expected, None if expected is None else "the request"

    def check(self, modality: str, key: str, size: int) -> None:
        if self.size is None:
            self.size, self.first = size, f"{modality}[{key!r}]"
        elif size != self.size:
            raise ValidationError(modality, key, f"batch size {self.size} (as {self.first})", f"batch size {size}")


def _get_group(container: Any, modality: str, kind: str) -> Mapping:
    if not isinstance(container, Mapping):
        raise ValidationError(kind, None, "a dict", _describe(container))
    if modality not in container:
        raise ValidationError(
            modality, None, f"key {modality!r} in the {kind}", f"keys {sorted(map(str, container))}", "missing"
        )
    group = container[modality]
    if not isinstance(group, Mapping):
        raise ValidationError(modality, None, "a dict of key -> array", _describe(group))
    return group


def _get_key(group: Mapping, modality: str, key: str) -> Any:
    if key not in group:
        raise ValidationError(modality, key, f"key present (have {sorted(map(str, group))})", "missing", "missing")
    return group[key]


def _check_array(
    modality: str, key: str, value: Any, dtype: type, ndim: int, layout: str, horizon: int, batch: _BatchTracker
) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise ValidationError(modality, key, f"numpy array {layout}", _describe(value))
    if value.dtype != dtype:
        raise ValidationError(modality, key, f"dtype {np.dtype(dtype)}", f"dtype {value.dtype}")
    if value.ndim != ndim:
        raise ValidationError(modality, key, f"{ndim}-D array {layout}", f"shape {value.shape}")
    batch.check(modality, key, value.shape[0])
    if value.shape[1] != horizon:
        raise ValidationError(modality, key, f"time horizon T={horizon}", f"T={value.shape[1]} (shape {value.shape})")
    return value


def check_observation(
    observation: Any, configs: ModalityConfigs, dims: ModalityDims | None = None, batch_size: int | None = None
) -> int:
    """Validate a nested observation; returns its batch size B."""
    dims = dims or ModalityDims()
    batch = _BatchTracker(batch_size)
    for modality in OBSERVATION_MODALITIES:
        config = configs.get(modality)
        if config is None or not config.modality_keys:
            continue
        group = _get_group(observation, modality, "observation")
        for key in config.modality_keys:
            value = _get_key(group, modality, key)
            if modality == "video":
                arr = _check_array(modality, key, value, np.uint8, 5, "(B, T, H, W, 3)", config.horizon, batch)
                if arr.shape[-1] != 3:
                    raise ValidationError(modality, key, "3 channels (RGB)", f"{arr.shape[-1]} (shape {arr.shape})")
                if key in dims.video and tuple(arr.shape[2:4]) != tuple(dims.video[key]):
                    raise ValidationError(modality, key, f"image size (H, W)={tuple(dims.video[key])}",
                                          f"{tuple(arr.shape[2:4])}")
            elif modality == "state":
                arr = _check_array(modality, key, value, np.float32, 3, "(B, T, D)", config.horizon, batch)
                if key in dims.state and arr.shape[2] != dims.state[key]:
                    raise ValidationError(modality, key, f"dimension D={dims.state[key]}", f"D={arr.shape[2]}")
            else:
                _check_language(key, value, config.horizon, batch)
    return batch.size if batch.size is not None else 0


def _check_language(key: str, value: Any, horizon: int, batch: _BatchTracker) -> None:
    layout = f"a list of B lists of {horizon} str, e.g. [['pick the cube']] * B"
    if not isinstance(value, (list, tuple)):
        raise ValidationError("language", key, layout, _describe(value))
    batch.check("language", key, len(value))
    for i, item in enumerate(value):
        if not isinstance(item, (list, tuple)) or len(item) != horizon:
            raise ValidationError("language", key, f"{layout}; item {i} a list of {horizon} str", _describe(item))
        for text in item:
            if not isinstance(text, str):
                raise ValidationError("language", key, f"str in item {i}", _describe(text))


def check_action(
    action: Any, configs: ModalityConfigs, dims: ModalityDims | None = None, batch_size: int | None = None
) -> int:
    """Validate an action dict ``{key: float32 (B, T, D)}``; returns its batch size."""
    dims = dims or ModalityDims()
    config = configs["action"]
    if not isinstance(action, Mapping):
        raise ValidationError("action", None, "a dict of key -> float32 (B, T, D) array", _describe(action))
    batch = _BatchTracker(batch_size)
    horizon = config.span
    for key in config.modality_keys:
        value = _get_key(action, "action", key)
        arr = _check_array("action", key, value, np.float32, 3, "(B, T, D)", horizon, batch)
        if key in dims.action and arr.shape[2] != dims.action[key]:
            raise ValidationError("action", key, f"dimension D={dims.action[key]}", f"D={arr.shape[2]}")
    return batch.size if batch.size is not None else 0
