"""The policy interface every served, replayed or local policy implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from ..types import ModalityConfigs, ModalityDims
from . import validation

Observation = dict[str, Any]
Action = dict[str, Any]
Info = dict[str, Any]


class BasePolicy(ABC):
    """``get_action(observation, options) -> (action, info)``, ``reset(options) -> info``.

    With ``strict=True`` observations and actions are validated against ``get_modality_config()``
    (and ``get_modality_dims()`` where the policy declares sizes); failures raise
    :class:`policyserve.errors.ValidationError`.
    """

    def __init__(self, *, strict: bool = True) -> None:
        self.strict = strict

    @abstractmethod
    def get_modality_config(self) -> ModalityConfigs:
        """Modality name -> ModalityConfig this policy consumes and produces."""

    def get_modality_dims(self) -> ModalityDims:
        """Per-key image sizes and state/action dimensions the policy declares (none by default)."""
        return ModalityDims()

    @abstractmethod
    def _get_action(self, observation: Observation, options: dict | None = None) -> tuple[Action, Info]:
        """Compute actions for a validated observation."""

    def reset(self, options: dict | None = None) -> Info:
        """Reset per-episode state; stateless policies return ``{}``."""
        return {}

    def check_observation(self, observation: Observation) -> int:
        return validation.check_observation(observation, self.get_modality_config(), self.get_modality_dims())

    def check_action(self, action: Action, batch_size: int | None = None) -> int:
        return validation.check_action(action, self.get_modality_config(), self.get_modality_dims(), batch_size)

    def get_action(self, observation: Observation, options: dict | None = None) -> tuple[Action, Info]:
        batch_size = self.check_observation(observation) if self.strict else None
        action, info = self._get_action(observation, options)
        if self.strict:
            self.check_action(action, batch_size or None)
        return action, info


class PolicyWrapper(BasePolicy):
    """A policy that adapts another one; forwards reset, modality config and dims."""

    def __init__(self, policy: BasePolicy, *, strict: bool = True) -> None:
        super().__init__(strict=strict)
        self.policy = policy

    def get_modality_config(self) -> ModalityConfigs:
        return self.policy.get_modality_config()

    def get_modality_dims(self) -> ModalityDims:
        return self.policy.get_modality_dims()

    def reset(self, options: dict | None = None) -> Info:
        return self.policy.reset(options)
