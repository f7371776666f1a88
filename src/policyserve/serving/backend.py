"""Backends: what the scheduler calls to run a policy (in this process, or on Ray replicas).

A backend gets the scheduler's merged batch of ``get_action`` requests (:meth:`Backend.run_batch`) and
answers one ``(action, info)`` or exception per request; the scheduler turns them into typed outcomes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence, Sized
from typing import Any, Union

from ..policies.base import Action, ActionRequest, BasePolicy, Info
from ..types import ModalityConfigs, ModalityDims
from .request import Request

BatchResult = Union[tuple[Action, Info], BaseException]
"""One request's share of a batch: ``(action, info)`` or the exception that request raised."""


class Backend(ABC):
    """Runs policy calls for the scheduler.

    ``batchable`` and ``row_options`` say which ``get_action`` requests may share one call (see
    :class:`~policyserve.policies.base.BasePolicy`); ``concurrency`` is how many calls may run at once.
    An ``info["server_timing"]`` map in a result is kept (doors add the server's timing to it).
    """

    batchable: bool = False
    row_options: frozenset[str] = frozenset()
    capabilities: frozenset[str] = frozenset()
    """What the served policy can do beyond a plain ``get_action`` (e.g. ``"rtc"``), see ``BasePolicy``."""
    concurrency: int = 1

    @abstractmethod
    def get_modality_config(self) -> ModalityConfigs:
        """The served policy's modality config (answered without queueing)."""

    def get_modality_dims(self) -> ModalityDims:
        """Per-key sizes the served policy declares (none by default)."""
        return ModalityDims()

    @abstractmethod
    def run_batch(self, requests: Sequence[Request]) -> list[BatchResult]:
        """Run one policy call for these ``get_action`` requests (merged when the policy is batchable);
        one result per request, in order."""

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
        self.capabilities = frozenset(getattr(policy, "capabilities", frozenset()))

    def get_modality_config(self) -> ModalityConfigs:
        return self.policy.get_modality_config()

    def get_modality_dims(self) -> ModalityDims:
        return self.policy.get_modality_dims()

    def run_batch(self, requests: Sequence[Request]) -> list[BatchResult]:
        return list(self.policy.serve_batch([to_action_request(r) for r in requests]))

    def reset(self, options: dict | None, client: str) -> Any:
        return self.policy.serve_reset(options, client)


def to_action_request(request: Request) -> ActionRequest:
    """The policy's view of a scheduled ``get_action`` request."""
    return ActionRequest(request.data.get("observation"), request.data.get("options"), request.client)


def replica_count(backend: Backend) -> float:
    """The backend's ``replicas`` (a count or a collection of replicas); 1 when it has none."""
    replicas = getattr(backend, "replicas", None)
    if replicas is None:
        return 1.0
    return float(len(replicas)) if isinstance(replicas, Sized) else float(replicas)
