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

Execution modes (``DriverConfig.execution``) and inference delay in simulated time
(``DriverConfig.inference_delay_steps = d``): a query made at env step t is answered at step t + d,
deterministically, whatever the real latency (the query runs at once; its reply is held back d steps).
One query is in flight at a time; a query goes out when an env has used its ``n_action_steps`` window.

- ``sync``: the env holds still while it waits (steps t .. t + d - 1), then executes the new chunk from its
  first action. "Holding still" repeats the env's last action, with ``hold_zero_dims`` set to 0: for
  absolute targets (joint or end-effector poses) repeating the last target holds the pose; for delta
  commands (policyserve's Franka envs: dims 0-5 are end-effector deltas) those dims must be 0.
- ``async`` (naive): the env keeps executing its current chunk (past its window) and switches to the new
  chunk at t + d, dropping the new chunk's first d actions.
- ``ensemble``: as ``async``, every action the weighted mean of the chunks that predicted it
  (``ensemble_coef``, default 0.01).
- ``rtc``: as ``async``, and each query carries every env's committed actions (the rest of its current
  chunk), the delay, ``n_action_steps`` as the execution horizon, and ``rtc_guidance`` and ``rtc_schedule``
  (``options["rtc"]``), so the server inpaints the new chunk to continue them (real-time chunking). A policy
  without the ``"rtc"`` capability, or a server that refuses the option, makes the driver fall back to
  ``async`` with one warning.

With ``inference_delay_steps=None`` (wall clock), ``async``/``ensemble``/``rtc`` run the query on a worker
thread (``async_inference``); ``rtc`` then sends the delay estimated as the measured round trip over the
control period (``control_period_s``, or the measured time between :meth:`PolicyDriver.act` calls).
``last_sources`` says which reply each env's latest action came from (negative: holding still), for
smoothness metrics.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigError, ServerError, ValidationError
from ..policies.base import BasePolicy
from ..types import RTC_GUIDANCES, RTC_SCHEDULES
from .adapter import EnvPolicyAdapter, to_numpy
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
    """Options sent with every ``get_action``. An integer ``"seed"`` is a base seed, not one noise draw for the
    whole run: each env's k-th query of an episode samples with its own seed, derived from (the base seed, the
    episode's seed, k) by :func:`query_seed`, so runs repeat exactly and successive chunks get fresh noise."""
    async_inference: bool = False
    """Ask for the next chunk while the current one executes (see module docstring)."""
    async_threshold: int | None = None
    """Async: send the next query when an env has at most this many actions left in its window
    (default ``n_action_steps // 2``)."""
    execution: str = "sync"
    """How chunks are executed while a query is answered: sync (hold still and wait), async (keep executing the
    current chunk, switch when the reply arrives), ensemble (async with temporal ensembling) or rtc (async, the
    server inpaints the committed actions: real-time chunking; falls back to async when it cannot)."""
    inference_delay_steps: int | None = None
    """Answer each query this many env steps after it is made, in simulated time (None: wall clock)."""
    hold_zero_dims: tuple[int, ...] = ()
    """Action dims set to 0 while an env holds still (delta commands); the others repeat the last action."""
    control_period_s: float | None = None
    """Wall clock, rtc: the env's control period for estimating the delay (default: measured between acts)."""
    rtc_guidance: str = "identity"
    """rtc: how the server guides the new chunk towards the committed actions: ``identity`` (the Jacobian taken as
    the identity: the committed actions are followed however confident the model is, and no backward pass) or
    ``vjp`` (the paper's vector-Jacobian product, which a confident model barely follows). Measured on Lift in the
    README."""
    rtc_schedule: str = "linear"
    """rtc: how the soft-mask weights decay after the frozen steps: ``linear`` or ``exp`` (the paper's)."""

    def __post_init__(self) -> None:
        if self.execution not in EXECUTION_MODES:
            raise ConfigError(f"execution must be one of {list(EXECUTION_MODES)}, got {self.execution!r}")
        if self.async_inference and self.execution == "sync":
            self.execution = "async"
        if self.execution == "ensemble" and self.ensemble_coef is None:
            self.ensemble_coef = DEFAULT_ENSEMBLE_COEF
        delay = self.inference_delay_steps
        if delay is not None and (isinstance(delay, bool) or not isinstance(delay, int) or delay < 0):
            raise ConfigError(f"inference_delay_steps must be an integer >= 0 or None, got {delay!r}")
        if delay is None and self.execution != "sync":
            self.async_inference = True
        for name, choices in (("rtc_guidance", RTC_GUIDANCES), ("rtc_schedule", RTC_SCHEDULES)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name} must be one of {list(choices)}, got {getattr(self, name)!r}")
        if self.control_period_s is not None and not self.control_period_s > 0:
            raise ConfigError(f"control_period_s must be > 0, got {self.control_period_s!r}")
        self.hold_zero_dims = tuple(int(d) for d in self.hold_zero_dims)
        ChunkingConfig(self.n_action_steps, self.ensemble_coef)  # validates both
        if self.async_threshold is None:
            self.async_threshold = self.n_action_steps // 2
        if isinstance(self.async_threshold, bool) or not isinstance(self.async_threshold, int) \
                or self.async_threshold < 0:
            raise ConfigError(f"async_threshold must be an integer >= 0, got {self.async_threshold!r}")


EXECUTION_MODES = ("sync", "async", "ensemble", "rtc")
DEFAULT_ENSEMBLE_COEF = 0.01
"""ACT's temporal-ensembling coefficient."""
_EMA = 0.2
"""Weight of the newest sample in the wall-clock round-trip and control-period estimates."""


@dataclass
class DriverStats:
    """What the policy cost: queries, their summed round-trip time, and the time the env loop waited for them."""

    queries: int = 0
    policy_time_s: float = 0.0
    wait_time_s: float = 0.0
    resets: int = 0
    hold_steps: int = 0
    """Env steps spent holding still (waiting for a reply with no action left, or in sync mode)."""


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
        self._episode_seeds: list[int | None] = [None] * self.n_envs
        self._queries = [0] * self.n_envs
        """Per env: queries whose chunk it took in its current episode (the k of :func:`query_seed`)."""
        self._offsets = [0] * self.n_envs
        self._generations = [0] * self.n_envs
        self._inflight: _Request | None = None
        self._executor = (ThreadPoolExecutor(1, thread_name_prefix="policyserve-driver")
                          if self.config.async_inference and self.config.inference_delay_steps is None else None)
        self.execution = self.config.execution
        """The execution mode in use (``rtc`` falls back to ``async`` when the policy cannot inpaint)."""
        self.last_sources = [-1] * self.n_envs
        """Per env: the number of the reply its latest action came from, or a negative number while it holds
        still (a new one for each stretch)."""
        self._replies = 0
        self._holds = 0
        self._last_actions: list[np.ndarray | None] = [None] * self.n_envs
        self._round_trip_s: float | None = None
        self._period_s: float | None = None
        self._last_act: float | None = None
        self._rtc_checked = False
        self._horizon = 0
        self._window: int | None = None
        self._action_dims: dict[str, int] = {}

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
    def reset(self, env_ids: Sequence[int] | np.ndarray | None = None, options: Mapping[str, Any] | None = None,
              *, seeds: Sequence[int] | int | None = None) -> None:
        """Envs ``env_ids`` (all when None) start new episodes: history and queued actions are dropped.

        Before their next action the policy is reset for them with ``{"env_ids": [...], **options}``; a list
        value in ``options`` holds one entry per env of ``env_ids``, a scalar applies to each of them
        (e.g. ``{"episode_index": [3, 5], "step_index": 0}`` for a replay). ``seeds``: the episodes' seeds (one
        per env, or one for all), which key the policy's sampling noise when ``action_options`` has a base
        ``"seed"`` (:func:`query_seed`); without them an env's episodes are numbered in the order they start.
        """
        ids = list(range(self.n_envs)) if env_ids is None else [int(i) for i in np.asarray(env_ids).reshape(-1)]
        bad = [i for i in ids if not 0 <= i < self.n_envs]
        if bad:
            raise ConfigError(f"env_ids {bad} out of range: the driver has n_envs={self.n_envs} (ids 0..{self.n_envs - 1})")
        options = dict(options or {})
        for key, value in options.items():
            if isinstance(value, (list, tuple, np.ndarray)) and len(value) != len(ids):
                raise ConfigError(f"reset options[{key!r}] has {len(value)} entries for {len(ids)} env_ids {ids}")
        if isinstance(seeds, (list, tuple, np.ndarray)) and len(seeds) != len(ids):
            raise ConfigError(f"reset seeds has {len(seeds)} entries for {len(ids)} env_ids {ids}")
        for j, i in enumerate(ids):
            self.adapter.reset([i])
            self.chunker.reset([i])
            self._generations[i] += 1
            self._pending_resets[i] = {k: _item(v, j) for k, v in options.items()}
            self._episode_seeds[i] = None if seeds is None else int(_item(seeds, j))
            self._queries[i] = 0
            self._last_actions[i] = None
            self.last_sources[i] = -1

    # ------------------------------------------------------------------ stepping
    def act(self, observation: Mapping[str, Any], active: Sequence[bool] | np.ndarray | None = None) -> Any:
        """Record the batched env ``observation`` ((n_envs, ...) arrays or tensors) and return the actions.

        Returns ``(n_envs, action_dim)`` float32 actions, a torch tensor on the observation's device when the
        observation holds torch tensors. With ``active`` (a mask) only those envs record and get an action;
        the others get zeros and keep their state.
        """
        ids = list(range(self.n_envs)) if active is None else [int(i) for i in np.flatnonzero(np.asarray(active))]
        self.adapter.push(observation, env_ids=ids)
        now = time.perf_counter()
        if self._last_act is not None:
            self._period_s = _ema(self._period_s, now - self._last_act)
        self._last_act = now
        rows = self._act_simulated(ids) if self.config.inference_delay_steps is not None else self._act_wall_clock(ids)
        dim = self.action_dim or (len(next(iter(rows.values()))) if rows else 0)
        actions = np.zeros((self.n_envs, dim), dtype=np.float32)
        for i, row in rows.items():
            actions[i] = row
        return _like(actions, observation)

    def _act_wall_clock(self, ids: list[int]) -> dict[int, np.ndarray]:
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
        return {i: self._pop(i) for i in ids}

    def _act_simulated(self, ids: list[int]) -> dict[int, np.ndarray]:
        """One step in simulated time: deliver the reply that is due, query when a window is used up."""
        if self._inflight is not None and self._due(self._inflight):
            self._collect()
        if self._inflight is None and any(self.chunker.remaining(i) == 0 for i in ids):
            self._request(ids)
            if self._due(self._inflight):  # type: ignore[arg-type]
                self._collect()
        waiting = set(self._inflight.targets) if self._inflight is not None and self.execution == "sync" else set()
        return {i: self._hold(i) if i in waiting or self.chunker.available(i) == 0 else self._pop(i) for i in ids}

    def _due(self, request: _Request) -> bool:
        """Whether ``inference_delay_steps`` env steps have passed since ``request`` was made."""
        current = [i for i in request.active if self._generations[i] == request.generations[i]]
        elapsed = max((self.chunker.step(i) - request.steps[i] for i in current), default=None)
        return elapsed is None or elapsed >= (self.config.inference_delay_steps or 0)

    def _pop(self, env_id: int) -> np.ndarray:
        action = self.chunker.pop(env_id)
        self._last_actions[env_id] = action
        self.last_sources[env_id] = self.chunker.source(env_id)
        return action

    def _hold(self, env_id: int) -> np.ndarray:
        """Hold env ``env_id`` still for one step (see ``DriverConfig.hold_zero_dims``)."""
        last = self._last_actions[env_id]
        action = np.zeros(self.action_dim or 0, np.float32) if last is None else last.copy()
        action[[d for d in self.config.hold_zero_dims if d < len(action)]] = 0.0
        self.chunker.skip(env_id)
        if self.last_sources[env_id] >= -1:  # a new stretch of holding still
            self._holds += 1
        self.last_sources[env_id] = -1 - self._holds
        self.stats.hold_steps += 1
        return action

    def _request(self, ids: list[int]) -> None:
        """Send one batched query (on the worker thread in async mode), with the pending per-env resets."""
        reset_envs = sorted(self._pending_resets)
        reset_options = None
        if reset_envs:
            keys = list(dict.fromkeys(k for i in reset_envs for k in self._pending_resets[i]))
            reset_options = {"env_ids": reset_envs,
                             **{k: [self._pending_resets[i].get(k) for i in reset_envs] for k in keys}}
            self._pending_resets = {}
        targets = ids if self.execution != "sync" else [i for i in ids if self.chunker.remaining(i) == 0]
        observation = self.adapter.build()
        options = self._seeded(self.config.action_options, targets)
        if self.execution == "rtc" and self._supports_rtc():
            rtc = self._rtc_option(targets)
            if rtc is not None:
                options = {**(options or {}), "rtc": rtc}
        if self._executor is None:
            future: Future = Future()
            start = time.perf_counter()
            try:
                future.set_result(self._call(reset_options, observation, options))
            except Exception as exc:  # noqa: BLE001 - re-raised by _collect, like the async path
                future.set_exception(exc)
            self.stats.wait_time_s += time.perf_counter() - start
        else:
            future = self._executor.submit(self._call, reset_options, observation, options)
        self._inflight = _Request(future, [self.chunker.step(i) for i in range(self.n_envs)],
                                  list(self._generations), list(ids), targets, reset_envs)

    def _seeded(self, options: dict[str, Any] | None, targets: list[int]) -> dict[str, Any] | None:
        """``options`` with an integer base ``"seed"`` replaced by one seed per env row (:func:`query_seed`)."""
        base = (options or {}).get("seed")
        if not _is_int(base):
            return options
        seeds = [query_seed(int(base), self._episode_key(i), self._queries[i]) for i in range(self.n_envs)]
        for i in targets:
            self._queries[i] += 1
        return {**(options or {}), "seed": seeds}

    def _episode_key(self, env_id: int) -> int:
        seed = self._episode_seeds[env_id]
        return self._generations[env_id] if seed is None else seed

    def _call(self, reset_options: dict[str, Any] | None, observation: dict[str, Any],
              options: dict[str, Any] | None) -> tuple[Any, ...]:
        reset_info = self.policy.reset(reset_options) if reset_options is not None else None
        start = time.perf_counter()
        try:
            action, info = self.policy.get_action(observation, options)
        except (ValidationError, ServerError) as exc:
            if not options or "rtc" not in options or "rtc" not in str(exc):
                raise
            self._fall_back(f"the policy refused the rtc option ({exc})")
            options = {k: v for k, v in options.items() if k != "rtc"} or None
            action, info = self.policy.get_action(observation, options)
        return reset_info, action, info, time.perf_counter() - start

    # ------------------------------------------------------------------ real-time chunking
    def _supports_rtc(self) -> bool:
        """Whether the policy (or the server behind a client) declares the ``rtc`` capability; checked once."""
        if not self._rtc_checked:
            self._rtc_checked = True
            if "rtc" not in getattr(self.policy, "capabilities", frozenset()):
                self._fall_back("the policy does not declare the 'rtc' capability")
        return self.execution == "rtc"

    def _fall_back(self, why: str) -> None:
        if self.execution == "rtc":
            self.execution = "async"
            warnings.warn(f"execution 'rtc' falls back to naive 'async': {why}", RuntimeWarning, stacklevel=3)

    def _rtc_option(self, targets: list[int]) -> dict[str, Any] | None:
        """Every target env's committed actions (the rest of its newest chunk, zero-padded, split by the policy's
        action keys) with the delay and execution horizon; None when no env has committed actions."""
        lengths = [0] * self.n_envs
        committed: dict[int, np.ndarray] = {}
        for i in targets:
            newest = self.chunker.newest(i)
            if newest is not None:
                start, actions = newest
                offset = max(0, self.chunker.step(i) - start)
                committed[i] = actions[offset:]
                lengths[i] = len(committed[i])
        longest = max(lengths)
        if longest == 0:
            return None
        delay = self._delay_steps(longest)
        dims = self._action_dims
        prefix = {key: np.zeros((self.n_envs, longest, dim), np.float32) for key, dim in dims.items()}
        for i, actions in committed.items():
            start = 0
            for key, dim in dims.items():
                prefix[key][i, : len(actions)] = actions[:, start : start + dim]
                start += dim
        return {"prefix": prefix, "inference_delay": [min(delay, n) for n in lengths], "prefix_length": lengths,
                "execution_horizon": min(self._window or self.config.n_action_steps, self._horizon),
                "guidance": self.config.rtc_guidance, "schedule": self.config.rtc_schedule}

    def _delay_steps(self, limit: int) -> int:
        """The delay in env steps: ``inference_delay_steps``, or round trip over control period (wall clock)."""
        if self.config.inference_delay_steps is not None:
            return min(self.config.inference_delay_steps, limit)
        period = self.config.control_period_s or self._period_s
        if not self._round_trip_s or not period:
            return 0
        return min(math.ceil(self._round_trip_s / period), limit)

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
        self._round_trip_s = _ema(self._round_trip_s, seconds)
        self._replies += 1
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
        self._horizon = chunks.shape[1]
        self._action_dims = {k: to_numpy(action.get(k, action.get(f"action.{k}"))).shape[-1]
                             for k in self.adapter.action_keys}
        delay = self.config.inference_delay_steps
        if delay is not None and delay >= self._horizon:
            raise ConfigError(f"inference_delay_steps={delay} must be below the policy's action horizon "
                              f"{self._horizon}: every action of a chunk would be late")
        served = _per_env(self.last_info.get("current_step"), self.n_envs)
        horizon = self.last_info.get("execution_horizon")
        window = horizon if isinstance(horizon, int) and not isinstance(horizon, bool) and horizon > 0 else None
        self._window = window
        if served is None:
            starts, targets = request.steps, request.targets
            if delay and self.execution == "sync":  # the env waited: the chunk starts when it arrives
                starts = [s + delay for s in starts]
        else:
            starts = [s - o for s, o in zip(served, self._offsets)]
            targets = request.active
        self.chunker.set_chunks(chunks, [i for i in targets if i in current], starts, window, source=self._replies - 1)

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


def query_seed(base: int, episode: int, query: int) -> int:
    """The sampling seed of an episode's ``query``-th query under a run's ``base`` seed (a 31-bit int).

    Distinct (base, episode, query) triples give independent seeds (numpy's ``SeedSequence``), so every chunk
    is sampled from fresh noise and a run is repeated exactly by repeating its base seed.
    """
    words = [int(v) % 2**32 for v in (base, base >> 32, episode, episode >> 32, query)]
    return int(np.random.SeedSequence(words).generate_state(1)[0] >> 1)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _ema(previous: float | None, sample: float) -> float:
    return sample if previous is None else (1 - _EMA) * previous + _EMA * sample


def _item(value: Any, index: int) -> Any:
    if isinstance(value, np.ndarray):
        return value[index].item()
    return value[index] if isinstance(value, (list, tuple)) else value


def _per_env(value: Any, n_envs: int) -> list[int] | None:
    """An info entry as one int per env (a scalar applies to all); None when absent or malformed."""
    if isinstance(value, (list, tuple)) and len(value) == n_envs:
        values = list(value)
    elif _is_int(value):
        values = [value] * n_envs
    else:
        return None
    if not all(_is_int(v) for v in values):
        return None
    return [int(v) for v in values]


def _like(actions: np.ndarray, observation: Mapping[str, Any]) -> Any:
    """``actions`` as a torch tensor on the observation's device when the observation holds torch tensors."""
    for value in observation.values():
        if type(value).__module__.startswith("torch") and hasattr(value, "device"):
            torch = sys.modules["torch"]  # loaded already: the observation holds its tensors
            return torch.as_tensor(actions, device=value.device)
    return actions

