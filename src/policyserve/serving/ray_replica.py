"""One policy replica: the class a Ray Serve deployment runs on any node of the cluster.

It builds its own policy (loads the checkpoint itself) from a picklable zero-argument callable such
as :meth:`policyserve.serving.spec.PolicySpec.build`, answers the merged batches the server's
scheduler sends (:meth:`PolicyReplica.run_batch`), and names itself in each result's
``info["server_timing"]["replica"]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..errors import PolicyServeError
from ..policies.base import ActionRequest, BasePolicy
from .request import FailureKind, error_message, failure_kind


class PolicyCallError(PolicyServeError):
    """A policy error raised in a replica, carried back as text (the policy's own exception types
    need not survive pickling); the message is what the in-process server would answer, and
    ``failure_kind`` the kind of failure it would report."""

    def __init__(self, message: str, failure_kind: FailureKind = FailureKind.INTERNAL) -> None:
        super().__init__(message)
        self.failure_kind = failure_kind

    def __reduce__(self) -> tuple:
        return PolicyCallError, (str(self), self.failure_kind)

    @classmethod
    def of(cls, exc: BaseException) -> PolicyCallError:
        """``exc`` as text and kind."""
        return cls(error_message(exc), failure_kind(exc))


class PolicyReplica:
    """Serve deployment body: ``describe``, ``run_batch`` (a merged batch), ``reset``, ``check_health``."""

    def __init__(self, build: Callable[[], BasePolicy]) -> None:
        import ray
        from ray import serve

        from ..cluster.runtime import loopback_serve_replica

        loopback_serve_replica()  # the local instance stays on loopback (Serve binds this replica's gRPC port widely)
        self.policy = build()
        self.name = serve.get_replica_context().replica_id.to_full_id_str()
        self.node = ray.get_runtime_context().get_node_id()

    def describe(self) -> dict[str, Any]:
        """What the front door answers without a replica call: modality config, batching attributes."""
        return {
            "modality_config": self.policy.get_modality_config(),
            "batchable": bool(getattr(self.policy, "batchable", False)),
            "row_options": frozenset(getattr(self.policy, "row_options", frozenset())),
            "capabilities": frozenset(getattr(self.policy, "capabilities", frozenset())),
            "replica": self.name,
        }

    def run_batch(self, requests: Sequence[ActionRequest]) -> list[Any]:
        """One result per request: ``(action, info)`` with ``info["server_timing"]["replica"]``, or a
        :class:`PolicyCallError`."""
        outcomes: list[Any] = []
        for outcome in self.policy.serve_batch(requests):
            if isinstance(outcome, BaseException):
                outcomes.append(PolicyCallError.of(outcome))
                continue
            action, info = outcome
            info = dict(info)
            info["server_timing"] = {**info.get("server_timing", {}), "replica": self.name,
                                     "replica_node": self.node}
            outcomes.append((action, info))
        return outcomes

    def reset(self, options: dict | None, client: str) -> Any:
        """The policy's reset result, or a :class:`PolicyCallError` (returned, not raised)."""
        try:
            return self.policy.serve_reset(options, client)
        except Exception as exc:  # noqa: BLE001 - answered to the client by the front door
            return PolicyCallError.of(exc)

    def check_health(self) -> None:
        """Serve's periodic health check: the policy must still answer its modality config."""
        self.policy.get_modality_config()
