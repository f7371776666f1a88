"""A model-free policy that answers correctly shaped actions for any modality config."""

from __future__ import annotations

import numpy as np

from ..types import ModalityConfigs, ModalityDims
from .base import Action, BasePolicy, Info, Observation


class ConstantPolicy(BasePolicy):
    """Returns ``value`` (or seeded uniform noise in [-1, 1] with ``noise=True``) for every action key.

    Action dimensions come from ``dims.action``; undeclared keys fall back to ``default_dim``.
    Useful as a stand-in server, for protocol tests and benchmarks.
    """

    batchable = True

    def __init__(
        self,
        modality_configs: ModalityConfigs,
        dims: ModalityDims | None = None,
        *,
        value: float = 0.0,
        noise: bool = False,
        seed: int = 0,
        default_dim: int = 1,
        strict: bool = True,
    ) -> None:
        super().__init__(strict=strict)
        self.modality_configs = modality_configs
        self.dims = dims or ModalityDims()
        self.value, self.noise, self.default_dim = value, noise, default_dim
        self._rng = np.random.default_rng(seed)
        self.calls = 0

    def get_modality_config(self) -> ModalityConfigs:
        return self.modality_configs

    def get_modality_dims(self) -> ModalityDims:
        return self.dims

    def _get_action(self, observation: Observation, options: dict | None = None) -> tuple[Action, Info]:
        from .batching import batch_size_of

        batch = batch_size_of(observation) if observation else int((options or {}).get("batch_size", 1))
        horizon = self.modality_configs["action"].span
        action = {}
        for key in self.modality_configs["action"].modality_keys:
            shape = (batch, horizon, self.dims.action.get(key, self.default_dim))
            if self.noise:
                action[key] = self._rng.uniform(-1, 1, size=shape).astype(np.float32)
            else:
                action[key] = np.full(shape, self.value, dtype=np.float32)
        self.calls += 1
        return action, {"calls": self.calls}
