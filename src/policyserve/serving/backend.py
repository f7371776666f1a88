"""Backends: what the scheduler calls to run a policy (in this process, or on Ray replicas)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..policies.base import ActionRequest, BasePolicy
from ..types import ModalityConfigs, ModalityDims

if TYPE_CHECKING:
    from .scheduler import Request

Outcome = Any
"""``(action, info)`` or the exception the request raised."""


class Backend(ABC):
    """Runs policy calls for the scheduler.

    ``batchable`` and ``row_options`` say which ``get_action`` requests may share one call (see
    :class:`~policyserve.policies.base.BasePolicy`); ``concurrency`` is how many calls may run at once.
    An ``info["server_timing"]`` map in an outcome is kept and completed by the scheduler.
    """

    batchable: bool = False
    row_options: frozenset[str] = frozenset()
    concurrency: int = 1

    @abstractmethod
    def get_modality_config(self) -> ModalityConfigs:
        """The served policy's modality config (answered without queueing)."""

    def get_modality_dims(self) -> ModalityDims:
        """Per-key sizes the served policy declares (none by default)."""
        return ModalityDims()

    @abstractmethod
    def get_action(self, requests: Sequence[Request]) -> list[Outcome]:
        """One outcome per request, in order."""

    @abstractmethod
    def reset(self, options: dict | None, client: str) -> Any:
        """Reset on behalf of ``client``."""

    def close(self) -> None:
        """Release what the backend holds."""


class PolicyBackend(Backend):
    """A :class:`BasePolicy` in this process."""

    def __init__(self, policy: BasePolicy) -> None:
        self.policy = policy
        self.batchable = bool(getattr(policy, "batchable", False))
        self.row_options = frozenset(getattr(policy, "row_options", frozenset()))

    def get_modality_config(self) -> ModalityConfigs:
        return self.policy.get_modality_config()

    def get_modality_dims(self) -> ModalityDims:
        return self.policy.get_modality_dims()

    def get_action(self, requests: Sequence[Request]) -> list[Outcome]:
        return self.policy.serve_get_action([to_action_request(r) for r in requests])

    def reset(self, options: dict | None, client: str) -> Any:
        return self.policy.serve_reset(options, client)


def to_action_request(request: Request) -> ActionRequest:
    return ActionRequest(request.data.get("observation"), request.data.get("options"), request.client)
