"""Per-env execution of action chunks: receding horizon and optional temporal ensembling.

Each policy query returns a chunk of H actions per env; :class:`ActionChunker` executes the first
``n_action_steps`` of it, one env step at a time, then asks for a new query (receding horizon). With
``ensemble_coef`` set, every action is the weighted mean of all chunks that predicted that time step,
weights ``exp(-coef * i)`` with ``i = 0`` for the oldest prediction (ACT's temporal ensembling).
Episodes are independent: :meth:`ActionChunker.reset` forgets an env's chunks so the next query
starts a fresh chunk for it without touching the others.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError


@dataclass
class ChunkingConfig:
    """How action chunks are executed: steps per query and optional temporal-ensembling coefficient."""

    n_action_steps: int = 8
    ensemble_coef: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.n_action_steps, bool) or int(self.n_action_steps) < 1:
            raise ConfigError(f"n_action_steps must be >= 1, got {self.n_action_steps!r}")
        self.n_action_steps = int(self.n_action_steps)
        if self.ensemble_coef is not None and self.ensemble_coef < 0:
            raise ConfigError(f"ensemble_coef must be >= 0, got {self.ensemble_coef}")


@dataclass
class _EnvQueue:
    t: int = 0
    query_t: int = 0
    has_chunk: bool = False
    chunks: list[tuple[int, np.ndarray]] = field(default_factory=list)


class ActionChunker:
    """Action queues of ``n_envs`` envs; one :meth:`set_chunks` per query, one :meth:`pop` per env step."""

    def __init__(self, n_envs: int, config: ChunkingConfig | None = None) -> None:
        self.n_envs = n_envs
        self.config = config or ChunkingConfig()
        self._queues = [_EnvQueue() for _ in range(n_envs)]

    def reset(self, env_ids: Iterable[int] | None = None) -> None:
        """Drop the chunks of ``env_ids`` (all when None); their next action comes from a fresh query."""
        for i in range(self.n_envs) if env_ids is None else env_ids:
            self._queues[int(i)] = _EnvQueue()

    def remaining(self, env_id: int) -> int:
        """Actions env ``env_id`` may still execute before it needs a new query."""
        q = self._queues[env_id]
        if not q.has_chunk:
            return 0
        return max(0, q.query_t + self.config.n_action_steps - q.t)

    def needs_query(self, env_ids: Iterable[int]) -> bool:
        """True when none of ``env_ids`` has an action left (all envs query together, in one batch)."""
        return all(self.remaining(i) == 0 for i in env_ids)

    def set_chunks(self, chunks: np.ndarray, env_ids: Sequence[int]) -> None:
        """Store the new chunk ``chunks[i]`` (H, D) of each env in ``env_ids`` (rows indexed by env id)."""
        chunks = np.asarray(chunks)
        if chunks.ndim != 3:
            raise ValueError(f"chunks must be (B, H, D), got shape {chunks.shape}")
        horizon = chunks.shape[1]
        if self.config.n_action_steps > horizon:
            raise ConfigError(
                f"n_action_steps={self.config.n_action_steps} exceeds the policy's action horizon {horizon}: "
                "lower --n-action-steps"
            )
        for i in env_ids:
            q = self._queues[i]
            if self.config.ensemble_coef is None:
                q.chunks = []
            q.chunks = [(t0, c) for t0, c in q.chunks if t0 + len(c) > q.t]
            q.chunks.append((q.t, chunks[i].copy()))
            q.query_t, q.has_chunk = q.t, True

    def pop(self, env_id: int) -> np.ndarray:
        """The action for env ``env_id``'s current step (advances its clock)."""
        q = self._queues[env_id]
        if self.remaining(env_id) == 0:
            raise RuntimeError(f"env {env_id} has no action left; query the policy first")
        preds = [c[q.t - t0] for t0, c in q.chunks if t0 <= q.t < t0 + len(c)]
        if self.config.ensemble_coef is None or len(preds) == 1:
            action = preds[-1]
        else:
            weights = np.exp(-self.config.ensemble_coef * np.arange(len(preds)))
            action = (np.stack(preds) * (weights / weights.sum())[:, None]).sum(axis=0).astype(preds[-1].dtype)
        q.t += 1
        return action
