"""Per-env action queues: receding-horizon chunk execution, chunk alignment and optional temporal ensembling.

Each policy reply holds a chunk of H actions per env, computed for one env step (the step whose observation
it answered, or the step a replay policy says its chunk starts at). :class:`ActionChunker` keeps every env's
clock and chunks: the first ``window`` actions of the newest chunk are executed before the next query is due
(receding horizon, ``window`` = ``n_action_steps`` or the policy's own execution horizon); the rest of the
chunk covers the steps until a late reply arrives. A chunk computed for an earlier step loses the actions
whose time has passed; one computed for a later step takes over at that step. With ``ensemble_coef`` set,
every action is the weighted mean of all chunks that predicted that step, weights ``exp(-coef * i)`` with
``i = 0`` for the oldest prediction (ACT's temporal ensembling). :meth:`ActionChunker.reset` forgets an
env's chunks and restarts its clock, so its next action comes from a fresh query.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError, PolicyServeError


class ChunkSyncError(PolicyServeError):
    """A chunk cannot be placed on the env's timeline (it starts after a gap, or all its steps have passed)."""


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
class _Chunk:
    start: int
    actions: np.ndarray
    window: int
    source: int = 0

    @property
    def end(self) -> int:
        return self.start + len(self.actions)


@dataclass
class _EnvQueue:
    t: int = 0
    chunks: list[_Chunk] = field(default_factory=list)
    source: int = -1


class ActionChunker:
    """Action queues of ``n_envs`` envs; :meth:`set_chunks` per policy reply, :meth:`pop` per env step."""

    def __init__(self, n_envs: int, config: ChunkingConfig | None = None) -> None:
        self.n_envs = n_envs
        self.config = config or ChunkingConfig()
        self._queues = [_EnvQueue() for _ in range(n_envs)]

    def reset(self, env_ids: Iterable[int] | None = None) -> None:
        """Drop the chunks of ``env_ids`` (all when None) and restart their clocks at step 0."""
        for i in range(self.n_envs) if env_ids is None else env_ids:
            self._queues[int(i)] = _EnvQueue()

    def step(self, env_id: int) -> int:
        """The step env ``env_id`` is at (actions popped since its last reset)."""
        return self._queues[env_id].t

    def remaining(self, env_id: int) -> int:
        """Actions left in the newest chunk's execution window: 0 means the next query is due."""
        q = self._queues[env_id]
        if not q.chunks:
            return 0
        newest = q.chunks[-1]
        return max(0, newest.start + newest.window - q.t)

    def available(self, env_id: int) -> int:
        """Actions env ``env_id`` can still execute without a new reply (past the window included)."""
        q = self._queues[env_id]
        covered = q.t
        for chunk in sorted(q.chunks, key=lambda c: c.start):
            if chunk.start <= covered < chunk.end:
                covered = chunk.end
        return covered - q.t

    def source(self, env_id: int) -> int:
        """The ``source`` of the chunk env ``env_id``'s latest action came from (the newest one when ensembling;
        -1 before any)."""
        return self._queues[env_id].source

    def newest(self, env_id: int) -> tuple[int, np.ndarray] | None:
        """The newest chunk of env ``env_id`` as (step it starts at, actions (H, D)); None when it has none."""
        chunks = self._queues[env_id].chunks
        return (chunks[-1].start, chunks[-1].actions) if chunks else None

    def skip(self, env_id: int) -> None:
        """Advance env ``env_id``'s clock by one step without executing an action (it held still)."""
        self._queues[env_id].t += 1

    def set_chunks(self, chunks: np.ndarray, env_ids: Sequence[int], start_steps: Sequence[int] | None = None,
                   window: int | None = None, source: int = 0) -> None:
        """Add chunk ``chunks[i]`` (H, D) for each env ``i`` in ``env_ids`` (rows indexed by env id).

        ``start_steps[i]`` is the env step the chunk was computed for (default: the env's current step);
        ``window`` the actions to execute before the next query (default ``n_action_steps``); ``source``
        labels the chunk (e.g. the reply's number, see :meth:`source`).
        """
        chunks = np.asarray(chunks)
        if chunks.ndim != 3:
            raise ValueError(f"chunks must be (B, H, D), got shape {chunks.shape}")
        horizon = chunks.shape[1]
        window = self.config.n_action_steps if window is None else int(window)
        if window > horizon:
            raise ConfigError(
                f"n_action_steps={window} exceeds the policy's action horizon {horizon}: lower n_action_steps"
            )
        for i in env_ids:
            q = self._queues[i]
            start = q.t if start_steps is None else int(start_steps[i])
            if start + horizon <= q.t:
                raise ChunkSyncError(f"env {i}: the chunk computed for step {start} ({horizon} actions) arrived at "
                                     f"step {q.t}, after all its actions' time had passed")
            covered = q.t + self.available(i)
            if start > covered:
                raise ChunkSyncError(f"env {i}: the policy answered the chunk for step {start} but the env is at step "
                                     f"{q.t} with actions only up to step {covered - 1}")
            q.chunks = [c for c in q.chunks if c.end > q.t]
            q.chunks.append(_Chunk(start, chunks[i].copy(), window, source))

    def pop(self, env_id: int) -> np.ndarray:
        """The action for env ``env_id``'s current step (advances its clock)."""
        q = self._queues[env_id]
        live = [c for c in q.chunks if c.start <= q.t < c.end]
        if not live:
            raise RuntimeError(f"env {env_id} has no action for step {q.t}; query the policy first")
        if self.config.ensemble_coef is None or len(live) == 1:
            action = live[-1].actions[q.t - live[-1].start]
        else:
            preds = np.stack([c.actions[q.t - c.start] for c in live])
            weights = np.exp(-self.config.ensemble_coef * np.arange(len(preds)))
            action = (preds * (weights / weights.sum())[:, None]).sum(axis=0).astype(preds.dtype)
        if self.config.ensemble_coef is None:
            newest = live[-1]
            q.chunks = [c for c in q.chunks if c is newest or c.start > newest.start]
        q.source = live[-1].source
        q.t += 1
        return action
