"""Real-time chunking (RTC; Black et al. 2025, arXiv 2506.07339): guided inpainting of a committed action prefix.

A client that executes action chunks asynchronously has already committed to the remainder of its
previous chunk when it asks for the next one. RTC samples the new chunk so that it agrees with that
remainder: the first ``inference_delay`` steps (executed before the answer arrives) are frozen, later
overlapping steps are pulled towards the prefix with soft weights that decay to 0 at step
``H - execution_horizon``, and the rest is free. At every denoising step the flow velocity is corrected
by the vector-Jacobian product of the weighted error between the prefix and the predicted final chunk
(pseudoinverse guidance), with the guidance weight clipped at ``max_guidance_weight`` (beta).

Pseudoinverse guidance moves a sample only as far as the model is unsure of it: a confident
(near-deterministic) denoiser has a small Jacobian and barely follows the prefix. ``"guidance": "identity"``
takes the Jacobian of the predicted chunk as the identity instead: every denoising step then moves the
predicted chunk a fraction ``W`` (the soft-mask weight) of the way to the target, with the velocity
``W (target - x1_hat) / (1 - t)`` clipped at beta, so frozen steps land on the prefix and the soft-mask steps
blend from the prefix into the model's own chunk; it needs no backward pass.

A model trained with training-time RTC (``ModelConfig.rtc_max_delay``, Black et al. 2025, arXiv 2512.05964)
is instead conditioned on the frozen steps: they are held at the prefix, at flow time 1, throughout
sampling (up to ``rtc_max_delay`` of them), and only the soft-mask steps after them are guided.

The served option, per request (``prefix`` in the policy's un-normalized action space)::

    options={"rtc": {"prefix": {action_key: (B, P, D)}, "inference_delay": d, "execution_horizon": s,
                     "max_guidance_weight": 5.0, "schedule": "exp", "guidance": "vjp",
                     "prefix_length": [P_0, ...]}}

``inference_delay`` may be one int or one per row; the optional ``prefix_length`` (one int per row,
0 to P) says how much of each row's zero-padded prefix is committed, 0 meaning "no prefix: sample as usual".

Time convention: the policy's flow runs from t=0 (noise) to t=1 (data), ``x_t = (1 - t) noise + t action``,
so the predicted final chunk at time t is ``x + (1 - t) v(x, t)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import ValidationError
from ..types import RTC_GUIDANCES, RTC_SCHEDULES

RTC_OPTION = "rtc"
"""The ``get_action`` option key that asks for real-time chunking."""
DEFAULT_MAX_GUIDANCE_WEIGHT = 5.0
"""The paper's beta."""
_REQUIRED = ("prefix", "inference_delay", "execution_horizon")
_OPTIONAL = ("max_guidance_weight", "schedule", "guidance", "prefix_length")


@dataclass(frozen=True)
class RTCRequest:
    """One request's parsed ``options["rtc"]``; ``prefix`` arrays are (B, P, D) float32, un-normalized.

    ``inference_delay`` and ``prefix_lengths`` hold one value per row.
    """

    prefix: dict[str, np.ndarray]
    inference_delay: list[int]
    execution_horizon: int
    max_guidance_weight: float = DEFAULT_MAX_GUIDANCE_WEIGHT
    schedule: str = "exp"
    prefix_lengths: list[int] | None = None
    """Committed steps per row (None: all P)."""
    guidance: str = "vjp"
    """How the velocity is corrected: one of :data:`RTC_GUIDANCES`."""

    @property
    def prefix_length(self) -> int:
        return int(next(iter(self.prefix.values())).shape[1])

    @property
    def rows(self) -> int:
        return int(next(iter(self.prefix.values())).shape[0])

    def length(self, row: int) -> int:
        """Committed prefix steps of ``row``."""
        return self.prefix_length if self.prefix_lengths is None else self.prefix_lengths[row]

    @classmethod
    def parse(cls, value: Any, action_dims: Mapping[str, int], horizon: int, batch: int | None) -> RTCRequest:
        """Check an ``options["rtc"]`` value against the policy's action keys/dims and chunk length ``horizon``.

        ``batch`` is the request's batch size (None: taken from the prefix). Raises
        :class:`ValidationError` naming the field, what was expected and what was given.
        """
        if not isinstance(value, Mapping):
            raise ValidationError("options", RTC_OPTION, "a map with keys " + ", ".join(_REQUIRED),
                                  type(value).__name__)
        unknown = sorted(set(map(str, value)) - set(_REQUIRED) - set(_OPTIONAL))
        missing = [k for k in _REQUIRED if k not in value]
        if unknown or missing:
            raise ValidationError("options", RTC_OPTION, f"keys {list(_REQUIRED)} (optional {list(_OPTIONAL)})",
                                  f"keys {sorted(map(str, value))}", "has unknown or missing keys")
        prefix = value["prefix"]
        if not isinstance(prefix, Mapping) or sorted(map(str, prefix)) != sorted(action_dims):
            actual = sorted(map(str, prefix)) if isinstance(prefix, Mapping) else type(prefix).__name__
            raise ValidationError("options.rtc", "prefix", f"a map of the action keys {sorted(action_dims)}", actual)
        arrays: dict[str, np.ndarray] = {}
        length: int | None = None
        for key, dim in action_dims.items():
            array = np.asarray(prefix[key])
            rows = batch if batch is not None else (array.shape[0] if array.ndim == 3 else "B")
            p = length if length is not None else "P"
            expected = f"shape ({rows}, {p}, {dim}) with 1 <= P <= {horizon}"
            if (array.ndim != 3 or array.shape[2] != dim or (batch is not None and array.shape[0] != batch)
                    or not 1 <= array.shape[1] <= horizon or (length is not None and array.shape[1] != length)):
                raise ValidationError("options.rtc.prefix", key, expected, f"shape {array.shape}")
            if not np.issubdtype(array.dtype, np.number):
                raise ValidationError("options.rtc.prefix", key, "a numeric array", f"dtype {array.dtype}")
            if not np.isfinite(array).all():
                raise ValidationError("options.rtc.prefix", key, "finite values", "NaN or inf")
            arrays[key] = array.astype(np.float32, copy=False)
            length = array.shape[1]
        assert length is not None
        rows = next(iter(arrays.values())).shape[0]
        lengths = value.get("prefix_length")
        if lengths is not None:
            lengths = _ints(lengths, "prefix_length", rows, 0, length, f"at most the prefix length P={length}")
        delays = value["inference_delay"]
        if isinstance(delays, (list, tuple, np.ndarray)):
            delays = _ints(delays, "inference_delay", rows, 0, length, "at most the committed prefix length")
        else:
            delays = [_int(delays, "inference_delay", 0, length,
                           f"at most the prefix length P={length}: the frozen steps must be committed")] * rows
        for row, (delay, committed) in enumerate(zip(delays, lengths or [length] * rows)):
            if delay > committed:
                raise ValidationError("options.rtc", "inference_delay", f"at most row {row}'s prefix_length "
                                      f"{committed} (the frozen steps must be committed)", delay)
        horizon_s = _int(value["execution_horizon"], "execution_horizon", 1, horizon,
                         f"at most the chunk length H={horizon}")
        beta = value.get("max_guidance_weight", DEFAULT_MAX_GUIDANCE_WEIGHT)
        if isinstance(beta, bool) or not isinstance(beta, (int, float, np.integer, np.floating)) \
                or not math.isfinite(beta) or beta < 0:
            raise ValidationError("options.rtc", "max_guidance_weight", "a finite number >= 0", repr(beta))
        schedule = value.get("schedule", "exp")
        if schedule not in RTC_SCHEDULES:
            raise ValidationError("options.rtc", "schedule", f"one of {list(RTC_SCHEDULES)}", repr(schedule))
        guidance = value.get("guidance", "vjp")
        if guidance not in RTC_GUIDANCES:
            raise ValidationError("options.rtc", "guidance", f"one of {list(RTC_GUIDANCES)}", repr(guidance))
        return cls(arrays, delays, horizon_s, float(beta), str(schedule), lengths, str(guidance))

    def row(self, index: int) -> RTCRequest | None:
        """The same request restricted to batch row ``index`` (prefix arrays (1, L, D), L its committed
        length); None when that row has no committed prefix."""
        length = self.length(index)
        if length == 0:
            return None
        return RTCRequest({k: v[index : index + 1, :length] for k, v in self.prefix.items()},
                          [self.inference_delay[index]], self.execution_horizon, self.max_guidance_weight,
                          self.schedule, guidance=self.guidance)

    def weights(self, horizon: int) -> np.ndarray:
        """The soft mask (H,) of a one-row request, see :func:`soft_mask`."""
        return soft_mask(horizon, self.inference_delay[0], self.execution_horizon, self.prefix_length, self.schedule)


def _ints(values: Any, name: str, rows: int, low: int, high: int, what: str) -> list[int]:
    values = list(values)
    if len(values) != rows:
        raise ValidationError("options.rtc", name, f"one int per batch row ({rows})", f"{len(values)} values")
    return [_int(v, name, low, high, what) for v in values]


def _int(value: Any, name: str, low: int, high: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise ValidationError("options.rtc", name, f"an int from {low} to {high} ({what})", repr(value))
    return int(value)


def soft_mask(horizon: int, delay: int, execution_horizon: int, prefix_length: int,
              schedule: str = "exp") -> np.ndarray:
    """Guidance weights (H,) over the new chunk's steps (the paper's eq. 5).

    1 on the first ``delay`` steps (frozen: executed before the new chunk arrives); then decaying to 0
    at step ``end = min(H - execution_horizon, prefix_length)`` (``"exp"``: ``c (e^c - 1) / (e - 1)``,
    ``"linear"``: ``c``, with ``c = (end - i) / (end - delay + 1)``); 0 from ``end`` on (no target there).
    """
    if schedule not in RTC_SCHEDULES:
        raise ValueError(f"schedule must be one of {RTC_SCHEDULES}, got {schedule!r}")
    weights = np.zeros(horizon, dtype=np.float32)
    weights[:delay] = 1.0
    end = min(horizon - execution_horizon, prefix_length)
    if end > delay:
        c = (end - np.arange(delay, end)) / (end - delay + 1)
        weights[delay:end] = c * np.expm1(c) / (math.e - 1) if schedule == "exp" else c
    return weights


@dataclass
class Guidance:
    """Per-row inpainting targets of one batched sampling call (rows without RTC have zero weights).

    ``target`` (B, H, A): normalized prefix, zero-padded; ``weights`` (B, H); ``max_weight`` (B,) = beta;
    ``held`` (B, H) bool: the steps held at the target instead of guided (training-time RTC; None: none);
    ``identity`` (B,) bool: the rows guided with the Jacobian taken as the identity (None: none).
    """

    target: Tensor
    weights: Tensor
    max_weight: Tensor
    held: Tensor | None = None
    identity: Tensor | None = None

    def to(self, device: torch.device | str) -> Guidance:
        return Guidance(self.target.to(device), self.weights.to(device), self.max_weight.to(device),
                        *(None if t is None else t.to(device) for t in (self.held, self.identity)))

    @property
    def guides(self) -> bool:
        """Whether any row has a guided step (a weight and beta above 0)."""
        return bool(((self.weights > 0).any(dim=1) & (self.max_weight > 0)).any())


def guidance_weight(t: float, max_weight: Tensor) -> Tensor:
    """The paper's ``min(beta, (1 - t) / (t r_t^2))`` with ``r_t^2 = (1 - t)^2 / (t^2 + (1 - t)^2)``."""
    if t <= 0.0 or t >= 1.0:
        return max_weight
    return torch.clamp(max_weight, max=(t * t + (1 - t) ** 2) / (t * (1 - t)))


def guided_velocity(velocity: Callable[[Tensor], Tensor], x: Tensor, t: float, guidance: Guidance) -> Tensor:
    """``v(x) + w(t) * J^T diag(W) (target - x1_hat)``, where ``x1_hat = x + (1 - t) v(x)`` is the predicted chunk.

    ``velocity`` maps noisy chunks (B, H, A) at flow time ``t`` to velocities; the correction moves the
    predicted chunk towards ``guidance.target`` on the weighted steps. Rows in ``guidance.identity`` take J as
    the identity, with ``w(t) = min(beta, 1 / (1 - t))``.
    """
    identity = guidance.identity
    if identity is not None and bool(identity.all()):  # no row needs the Jacobian: no backward pass
        v = velocity(x)
        return v + _identity_correction(x, v, t, guidance)
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        v = velocity(xg)
        predicted = xg + (1.0 - t) * v
        error = (guidance.target - predicted.detach()) * guidance.weights.unsqueeze(-1)
        (correction,) = torch.autograd.grad(predicted, xg, error)
    v = v.detach()
    corrected = v + guidance_weight(t, guidance.max_weight).view(-1, 1, 1) * correction
    if identity is None:
        return corrected
    return torch.where(identity.view(-1, 1, 1), v + _identity_correction(x, v, t, guidance), corrected)


def _identity_correction(x: Tensor, v: Tensor, t: float, guidance: Guidance) -> Tensor:
    """``min(beta, 1 / (1 - t)) * diag(W) (target - x1_hat)``: the correction with J taken as the identity."""
    error = (guidance.target - (x + (1.0 - t) * v)) * guidance.weights.unsqueeze(-1)
    return torch.clamp(guidance.max_weight.view(-1, 1, 1), max=1.0 / (1.0 - t)) * error


def build_guidance(rows: list[RTCRequest | None], horizon: int, normalize: Callable[[str, np.ndarray], np.ndarray],
                   action_dims: Mapping[str, int], condition_limit: int = 0) -> Guidance | None:
    """The :class:`Guidance` of a batch whose row ``i`` asks for ``rows[i]`` (one-row requests; None: no RTC).

    ``normalize(key, array)`` maps un-normalized actions of ``key`` to the network's space. A model trained with
    training-time RTC up to ``condition_limit`` steps has each row's first ``min(inference_delay,
    condition_limit)`` steps held at the prefix (exact); guidance covers the rest of the soft mask.
    Returns None when no row asks for RTC.
    """
    if all(row is None for row in rows):
        return None
    batch, width = len(rows), sum(action_dims.values())
    target = np.zeros((batch, horizon, width), dtype=np.float32)
    weights = np.zeros((batch, horizon), dtype=np.float32)
    beta = np.zeros(batch, dtype=np.float32)
    held = np.zeros((batch, horizon), dtype=bool)
    identity = np.zeros(batch, dtype=bool)
    for i, row in enumerate(rows):
        if row is None:
            continue
        start = 0
        for key, dim in action_dims.items():
            target[i, : row.prefix_length, start : start + dim] = normalize(key, row.prefix[key][0])
            start += dim
        weights[i] = row.weights(horizon)
        beta[i] = row.max_guidance_weight
        identity[i] = row.guidance == "identity"
        frozen = min(row.inference_delay[0], condition_limit)
        held[i, :frozen] = True
        weights[i, :frozen] = 0.0  # held exactly: nothing to guide
    return Guidance(torch.from_numpy(target), torch.from_numpy(weights), torch.from_numpy(beta),
                    torch.from_numpy(held) if held.any() else None,
                    torch.from_numpy(identity) if identity.any() else None)
