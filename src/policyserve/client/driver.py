"""PolicyDriver: batched env observations in, batched env actions out, for any env loop (IsaacLab, robot, MuJoCo).

One driver serves ``n_envs`` envs stepped together. It owns the policy (usually a
:class:`~policyserve.client.policy_client.PolicyClient`), the env-to-policy key map and frame history
(:class:`~policyserve.client.adapter.EnvPolicyAdapter`), every env's action-chunk queue
(:class:`~policyserve.client.chunking.ActionChunker`: ``n_action_steps``, optional temporal ensembling) and
the per-env reset bookkeeping: :meth:`PolicyDriver.reset` restarts chosen envs only, and the policy is reset
for exactly those envs (``{"env_ids": [...], ...}``) before their next action.

Sync mode: when an env has used the ``n_action_steps`` of its chunk, :meth:`PolicyDriver.act` sends one
batched query and waits; only the envs that were due take the new chunk, so every env's chunk boundaries
follow its own episode and a deterministic policy gives the same per-episode actions for any ``n_envs``.

Async mode (``async_inference=True``, LeRobot's async inference on GR00T's wire): when an env has at most
``async_threshold`` actions left in its window, the next batched query goes out on a worker thread and the
envs keep executing their current chunks (past the window when needed) while it runs. Each reply is placed on
every env's timeline at the step it was computed for, so the actions whose time has passed are dropped.
:meth:`PolicyDriver.act` waits only when an env has no action at all (a fresh episode, or a reply slower
than the rest of a chunk).

Replies that say which step their chunk starts at (a replay policy's ``info["current_step"]``, relative to
the step its last reset reported) are aligned by it, and a reply's ``info["execution_horizon"]`` replaces
``n_action_steps``: a replay server is followed in step whatever its execution horizon.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigError, ValidationError
from ..policies.base import BasePolicy
from .adapter import EnvPolicyAdapter
from .chunking import ActionChunker, ChunkingConfig
from .connect import connect_policy
from .keymap import KeyMap, key_map_template


@dataclass
class DriverConfig:
    """How a :class:`PolicyDriver` maps envs to the policy and executes its action chunks."""

    n_action_steps: int = 8
    """Actions of each chunk executed before the next query (receding horizon); a reply's
    ``info["execution_horizon"]`` (replay servers) takes precedence."""
    ensemble_coef: float | None = None
    """Temporal ensembling of overlapping chunks with weights ``exp(-coef * i)``; None executes the newest chunk."""
    key_map: KeyMap = field(default_factory=KeyMap)
    """Env key -> policy key (:class:`~policyserve.client.keymap.KeyMap`); :meth:`PolicyDriver.check` drafts one."""
    action_options: dict[str, Any] | None = None
    """Options sent with every ``get_action`` (e.g. ``{"seed": 0}`` for a deterministic model server)."""
    async_inference: bool = False
    """Ask for the next chunk while the current one executes (see module docstring)."""
    async_threshold: int | None = None
    """Async: send the next query when an env has at most this many actions left in its window
    (default ``n_action_steps // 2``)."""

    def __post_init__(self) -> None:
        ChunkingConfig(self.n_action_steps, self.ensemble_coef)  # validates both
        if self.async_threshold is None:
            self.async_threshold = self.n_action_steps // 2
        if isinstance(self.async_threshold, bool) or not isinstance(self.async_threshold, int) \
                or self.async_threshold < 0:
            raise ConfigError(f"async_threshold must be an integer >= 0, got {self.async_threshold!r}")


@dataclass
class DriverStats:
    """What the policy cost: queries, their summed round-trip time, and the time the env loop waited for them."""

    queries: int = 0
    policy_time_s: float = 0.0
    wait_time_s: float = 0.0
    resets: int = 0


@dataclass
class _Request:
    future: Future
    steps: list[int]
    """Each env's step when the observation was taken."""
    generations: list[int]
    active: list[int]
    targets: list[int]
    """Envs that take the reply's chunk (all of them when the reply states its steps)."""
    reset_envs: list[int]


class PolicyDriver:
    """Batched env observations -> batched env actions through a policy (see module docstring).

    ``policy`` is any :class:`~policyserve.policies.base.BasePolicy`; :meth:`connect` makes a client to a
    server and owns it. ``action_dim`` (the env's action size) is checked against every reply.
    """

    def __init__(self, policy: BasePolicy, n_envs: int = 1, config: DriverConfig | None = None, *,
                 action_dim: int | None = None, owns_policy: bool = False) -> None:
        self.policy = policy
        self.n_envs = int(n_envs)
        self.config = config or DriverConfig()
        self.action_dim = action_dim
        self.owns_policy = owns_policy
        self.adapter = EnvPolicyAdapter(policy.get_modality_config(), self.n_envs, self.config.key_map)
        self.chunker = ActionChunker(self.n_envs, ChunkingConfig(self.config.n_action_steps,
                                                                  self.config.ensemble_coef))
        self.stats = DriverStats()
        self.last_info: dict[str, Any] = {}
        """``info`` of the latest ``get_action`` reply."""
        self.reset_info: dict[str, Any] = {}
        """``info`` of the latest policy reset."""
        self._pending_resets: dict[int, dict[str, Any]] = {i: {} for i in range(self.n_envs)}
        self._offsets = [0] * self.n_envs
        self._generations = [0] * self.n_envs
        self._inflight: _Request | None = None
        self._executor = (ThreadPoolExecutor(1, thread_name_prefix="policyserve-driver")
                          if self.config.async_inference else None)

    @classmethod
    def connect(cls, host: str = "127.0.0.1", port: int = 5555, n_envs: int = 1, config: DriverConfig | None = None,
                *, api_token: str | None = None, timeout_ms: int = 15000,
                action_dim: int | None = None) -> PolicyDriver:
        """A driver of a server at ``host:port`` (which must answer a ping); :meth:`close` closes the client."""
        client = connect_policy(host, port, api_token=api_token, timeout_ms=timeout_ms)
        try:
            return cls(client, n_envs, config, action_dim=action_dim, owns_policy=True)
        except BaseException:
            client.close()
            raise

    def check(self, observation: Mapping[str, Any], *, show: bool = True) -> str:
        """Check the key map against an env ``observation``; returns (and with ``show`` prints) "key map OK" or
        the problems and a ready-to-edit key-map template listing the env's keys."""
        try:
            self.adapter.check_env_observation(observation)
            text = "key map OK: " + ", ".join(f"{t} <- {e}" for t, e in self.adapter.required_env_keys().items())
        except ValidationError as exc:
            text = f"{exc}\n" + key_map_template(observation, self.adapter.configs, self.config.key_map)
        if show:
            print(text)
        return text

    # ------------------------------------------------------------------ episodes
    def reset(self, env_ids: Sequence[int] | np.ndarray | None = None, options: Mapping[str, Any] | None = None) -> None:
        """Envs ``env_ids`` (all when None) start new episodes: history and queued actions are dropped.

        Before their next action the policy is reset for them with ``{"env_ids": [...], **options}``; a list
        value in ``options`` holds one entry per env of ``env_ids``, a scalar applies to each of them
        (e.g. ``{"episode_index": [3, 5], "step_index": 0}`` for a replay).
        """
        ids = list(range(self.n_envs)) if env_ids is None else [int(i) for i in np.asarray(env_ids).reshape(-1)]
        bad = [i for i in ids if not 0 <= i < self.n_envs]
        if bad:
            raise ConfigError(f"env_ids {bad} out of range: the driver has n_envs={self.n_envs} (ids 0..{self.n_envs - 1})")
        options = dict(options or {})
        for key, value in options.items():
            if isinstance(value, (list, tuple, np.ndarray)) and len(value) != len(ids):
                raise ConfigError(f"reset options[{key!r}] has {len(value)} entries for {len(ids)} env_ids {ids}")
        for j, i in enumerate(ids):
            self.adapter.reset([i])
            self.chunker.reset([i])
            self._generations[i] += 1
            self._pending_resets[i] = {k: _item(v, j) for k, v in options.items()}

    # ------------------------------------------------------------------ stepping
    def act(self, observation: Mapping[str, Any], active: Sequence[bool] | np.ndarray | None = None) -> Any:
        """Record the batched env ``observation`` ((n_envs, ...) arrays or tensors) and return the actions.

        Returns ``(n_envs, action_dim)`` float32 actions, a torch tensor on the observation's device when the
        observation holds torch tensors. With ``active`` (a mask) only those envs record and get an action;
        the others get zeros and keep their state.
        """
        ids = list(range(self.n_envs)) if active is None else [int(i) for i in np.flatnonzero(np.asarray(active))]
        self.adapter.push(observation, env_ids=ids)
        if self._inflight is not None and self._inflight.future.done():
            self._collect()
        if any(self.chunker.available(i) == 0 for i in ids):
            if self._inflight is not None:
                self._collect()
            if any(self.chunker.available(i) == 0 for i in ids):
                self._request(ids)
                self._collect()
        elif not self.config.async_inference and any(self.chunker.remaining(i) == 0 for i in ids):
            self._request(ids)
            self._collect()
        if self.config.async_inference and self._inflight is None and any(
                self.chunker.remaining(i) <= self.config.async_threshold for i in ids):
            self._request(ids)
        rows = {i: self.chunker.pop(i) for i in ids}
        dim = self.action_dim or (len(next(iter(rows.values()))) if rows else 0)
        actions = np.zeros((self.n_envs, dim), dtype=np.float32)
        for i, row in rows.items():
            actions[i] = row
        return _like(actions, observation)

    def _request(self, ids: list[int]) -> None:
        """Send one batched query (on the worker thread in async mode), with the pending per-env resets."""
        reset_envs = sorted(self._pending_resets)
        reset_options = None
        if reset_envs:
            keys = list(dict.fromkeys(k for i in reset_envs for k in self._pending_resets[i]))
            reset_options = {"env_ids": reset_envs,
                             **{k: [self._pending_resets[i].get(k) for i in reset_envs] for k in keys}}
            self._pending_resets = {}
        targets = ids if self.config.async_inference else [i for i in ids if self.chunker.remaining(i) == 0]
        observation = self.adapter.build()
        if self._executor is None:
            future: Future = Future()
            start = time.perf_counter()
            try:
                future.set_result(self._call(reset_options, observation))
            except Exception as exc:  # noqa: BLE001 - re-raised by _collect, like the async path
                future.set_exception(exc)
            self.stats.wait_time_s += time.perf_counter() - start
        else:
            future = self._executor.submit(self._call, reset_options, observation)
        self._inflight = _Request(future, [self.chunker.step(i) for i in range(self.n_envs)],
                                  list(self._generations), list(ids), targets, reset_envs)

    def _call(self, reset_options: dict[str, Any] | None, observation: dict[str, Any]) -> tuple[Any, ...]:
        reset_info = self.policy.reset(reset_options) if reset_options is not None else None
        start = time.perf_counter()
        action, info = self.policy.get_action(observation, self.config.action_options)
        return reset_info, action, info, time.perf_counter() - start

    def _collect(self) -> None:
        """Wait for the query in flight and put its chunks on the envs' timelines."""
        request, self._inflight = self._inflight, None
        assert request is not None
        start = time.perf_counter()
        try:
            reset_info, action, info, seconds = request.future.result()
        finally:
            self.stats.wait_time_s += time.perf_counter() - start
        self.stats.queries += 1
        self.stats.policy_time_s += seconds
        current = [i for i in range(self.n_envs) if self._generations[i] == request.generations[i]]
        if reset_info is not None:
            self.stats.resets += 1
            self.reset_info = reset_info if isinstance(reset_info, dict) else {}
            started = _per_env(self.reset_info.get("current_step"), self.n_envs)
            for i in request.reset_envs:
                if i in current:
                    self._offsets[i] = 0 if started is None else started[i]
        self.last_info = info if isinstance(info, dict) else {}
        chunks = self.adapter.to_env_actions(action, self.action_dim)
        served = _per_env(self.last_info.get("current_step"), self.n_envs)
        horizon = self.last_info.get("execution_horizon")
        window = horizon if isinstance(horizon, int) and not isinstance(horizon, bool) and horizon > 0 else None
        if served is None:
            starts, targets = request.steps, request.targets
        else:
            starts = [s - o for s, o in zip(served, self._offsets)]
            targets = request.active
        self.chunker.set_chunks(chunks, [i for i in targets if i in current], starts, window)

    # ------------------------------------------------------------------ cleanup
    def close(self) -> None:
        """Wait for a query in flight, stop the worker thread and close the policy if the driver owns it."""
        if self._inflight is not None:
            self._inflight.future.exception()
            self._inflight = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self.owns_policy:
            close = getattr(self.policy, "close", None)
            if close is not None:
                close()

    def __enter__(self) -> PolicyDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _item(value: Any, index: int) -> Any:
    if isinstance(value, np.ndarray):
        return value[index].item()
    return value[index] if isinstance(value, (list, tuple)) else value


def _per_env(value: Any, n_envs: int) -> list[int] | None:
    """An info entry as one int per env (a scalar applies to all); None when absent or malformed."""
    if isinstance(value, (list, tuple)) and len(value) == n_envs:
        values = list(value)
    elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        values = [value] * n_envs
    else:
        return None
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        return None
    return [int(v) for v in values]


def _like(actions: np.ndarray, observation: Mapping[str, Any]) -> Any:
    """``actions`` as a torch tensor on the observation's device when the observation holds torch tensors."""
    for value in observation.values():
        if type(value).__module__.startswith("torch") and hasattr(value, "device"):
            torch = sys.modules["torch"]  # loaded already: the observation holds its tensors
            return torch.as_tensor(actions, device=value.device)
    return actions

