"""Where and how many policy replicas run (:class:`RayConfig`); importing it does not import Ray."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

__all__ = ["RayConfig", "parse_autoscale"]


@dataclass
class RayConfig:
    """Where and how many policy replicas run (see :class:`~policyserve.serving.ray_backend.RayBackend`)."""

    replicas: int = 1
    """Policy replicas on Ray Serve, each loading the policy itself."""
    ray_address: str | None = None
    """A running cluster (``ray start --head`` prints it); None starts a local Ray instance."""
    replica_cpus: float = 1.0
    """CPUs reserved per replica."""
    replica_gpus: float = 0.0
    """GPUs reserved per replica (use with a CUDA device)."""
    autoscale: tuple[int, int] | None = None
    """``(min, max)`` replicas, scaled by Serve on the calls in flight; ``replicas`` is then the
    initial count (within min..max)."""
    app_name: str | None = None
    """Serve application name (default: ``policyserve-<random>``, so servers can share a cluster)."""
    start_timeout_s: float = 300.0
    """Longest wait for the replicas to be running at start-up."""
    graceful_shutdown_s: float = 10.0
    """How long a replica being removed (scale-down, application removed) may finish its call; a call cut
    short is retried on another replica."""
    no_replica_timeout_s: float = 30.0
    """A call is answered "no policy replica available" after no replica has run for this long."""
    call_timeout_s: float = 600.0
    """Longest a replica may take to answer one call."""
    local_object_store_mb: int = 200
    """Object store size of a local Ray instance this server starts."""

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ConfigError(f"replicas must be >= 1, got {self.replicas}")
        if self.replica_cpus < 0 or self.replica_gpus < 0:
            raise ConfigError(f"replica_cpus and replica_gpus must be >= 0, got {self.replica_cpus} and "
                              f"{self.replica_gpus}")
        if self.autoscale is not None:
            low, high = self.autoscale
            if not 1 <= low <= high:
                raise ConfigError(f"autoscale MIN:MAX needs 1 <= MIN <= MAX, got {low}:{high}")
            if not low <= self.replicas <= high:
                raise ConfigError(f"replicas {self.replicas} is outside the autoscale range {low}:{high}")

    @property
    def max_replicas(self) -> int:
        """The most replicas that may run at once."""
        return self.autoscale[1] if self.autoscale else self.replicas


def parse_autoscale(text: str) -> tuple[int, int]:
    """``"MIN:MAX"`` -> ``(min, max)``; :class:`ConfigError` naming the expected form otherwise."""
    low, sep, high = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(low), int(high)
    except ValueError:
        raise ConfigError(f"autoscale expects MIN:MAX (two integers, e.g. 1:4), got {text!r}") from None
