"""Vectorised Franka envs.

:func:`make_vec_env`: a gymnasium VectorEnv of 1..N sub-envs in-process or in worker processes, without the
fork/GL hang (for your own loops, as in the README). :class:`EnvBatch`: the evaluation's in-process batch, where
each env runs its own episode and only the envs named step or reset (so an exact episode count never steps an
env past its last episode), with per-env state restore and one stacked observation for the driver.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from functools import partial
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv

from .envs import FrankaEnvConfig, gl_context_created, make_env


def _make_indexed_env(task: str, index: int, env_kwargs: dict[str, Any]) -> gym.Env:
    env = make_env(task, **env_kwargs)
    env.vector_index = index
    return env


def make_vec_env(
    task: str,
    n_envs: int,
    *,
    async_: bool | None = None,
    seed: int | None = None,
    autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
    context: str | None = None,
    **env_kwargs: Any,
) -> gym.vector.VectorEnv:
    """``n_envs`` Franka ``task`` envs as one gymnasium VectorEnv (observations batched env-first).

    ``async_`` (default: ``n_envs > 1``) runs each sub-env in its own worker process, started with
    the multiprocessing ``context``. By default that is "fork" while this process holds no GL context
    (sub-envs build their simulator lazily, so the parent never does; an env without cameras makes
    none) and "forkserver" once it does, since forking a process with a live GL context hangs.
    "forkserver"/"spawn" workers re-import the main script, so a script needs the usual
    ``if __name__ == "__main__":`` guard then; without it the workers die while starting and this
    raises a RuntimeError saying so.
    ``seed`` gives sub-env ``i`` the construction seed ``seed + i`` (gymnasium's ``reset(seed=s)`` also
    seeds sub-env ``i`` with ``s + i``). ``autoreset_mode`` is gymnasium's, NEXT_STEP by default: the step
    after an episode ends resets that sub-env and ignores its action, so ``info["success"]`` of the
    final step is reported as is. ``env_kwargs`` go to :func:`policyserve.sim.make_env`.
    Restore states into chosen sub-envs with :func:`restore_states`.
    """
    if n_envs < 1:
        raise ValueError(f"n_envs must be >= 1, got {n_envs}")
    if async_ is None:
        async_ = n_envs > 1
    fns = [
        partial(_make_indexed_env, task, i, {**env_kwargs, "seed": None if seed is None else seed + i})
        for i in range(n_envs)
    ]
    mode = AutoresetMode(autoreset_mode)
    if async_:
        if context is None:
            context = "forkserver" if gl_context_created() else "fork"
        try:
            # shared_memory=False: gymnasium's shared-memory reader snapshots Text entries ("task") once.
            return AsyncVectorEnv(fns, context=context, autoreset_mode=mode, shared_memory=False)
        except (ConnectionError, EOFError) as error:
            raise RuntimeError(_workers_died_message(context)) from error
    return SyncVectorEnv(fns, autoreset_mode=mode)


def _workers_died_message(context: str) -> str:
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    why = (
        f"; this process holds a GL context (an env was built), so workers start with {context!r}, "
        "which re-imports the main script in every worker" if gl_context_created() else ""
    )
    fix = (
        f'put the code of {main} that creates envs under `if __name__ == "__main__":`, or create the '
        "vector env before any other env" if main and context != "fork" else "see the workers' error above"
    )
    return f"make_vec_env: worker processes ({context!r} context) exited while starting{why}. Fix: {fix}."


def restore_states(vec_env: gym.vector.VectorEnv, states: Mapping[int, dict[str, Any]]) -> tuple[dict, dict]:
    """Restore ``{sub-env index: state}`` into those sub-envs only; returns the batched (obs, info).

    Sub-envs not named keep running (gymnasium's ``reset_mask``).
    """
    mask = np.zeros(vec_env.num_envs, dtype=bool)
    mask[list(states)] = True
    return vec_env.reset(options={"reset_mask": mask, "states": dict(states)})


class EnvBatch:
    """``envs`` stepped together in this process, each on its own episode: the evaluation's vector env.

    Unlike a gymnasium VectorEnv, only the envs named in :meth:`step` or :meth:`reset` move (an env that ran out
    of episodes stays where it is, so an exact episode count never steps an extra episode), and each env is
    reset on its own, from a seed or a saved state (``reset(i, state=...)``, as :func:`restore_states`).
    :meth:`observation` stacks the envs' latest observations env-first (texts as a list): the one place a
    rollout's observations are batched.
    """

    def __init__(self, envs: list[gym.Env]) -> None:
        if not envs:
            raise ValueError("an EnvBatch needs at least one env")
        self.envs = list(envs)
        self.num_envs = len(self.envs)
        self.single_action_space = self.envs[0].action_space
        self.last: list[dict[str, Any]] = [{} for _ in self.envs]
        """Each env's latest observation."""

    def reset(self, env_id: int, *, seed: int | None = None, state: dict[str, Any] | None = None) -> dict[str, Any]:
        """Start a new episode in env ``env_id`` (from ``seed``, or exactly at ``state``); returns its info."""
        obs, info = self.envs[env_id].reset(seed=seed, options=None if state is None else {"state": state})
        self.last[env_id] = obs
        return info

    def step(self, env_id: int, action: np.ndarray) -> tuple[float, bool, bool, dict[str, Any]]:
        """Step env ``env_id``; returns (reward, terminated, truncated, info), its observation in :attr:`last`."""
        obs, reward, terminated, truncated, info = self.envs[env_id].step(action)
        self.last[env_id] = obs
        return float(reward), bool(terminated), bool(truncated), info

    def observation(self, keys: list[str], env_ids: list[int] | None = None) -> dict[str, Any]:
        """The latest observations of ``env_ids`` (all envs by default) as one dict of ``keys``: arrays stacked
        env-first, texts listed. Keys some env lacks are left out (the driver names the missing key)."""
        observations = [self.last[i] for i in (range(self.num_envs) if env_ids is None else env_ids)]
        batched: dict[str, Any] = {}
        for key in keys:
            values = [obs[key] for obs in observations if key in obs]
            if len(values) != len(observations):
                continue
            batched[key] = list(values) if isinstance(values[0], (str, bytes)) else np.stack(values)
        return batched

    def close(self) -> None:
        """Close every env."""
        for env in self.envs:
            env.close()


def make_env_batch(task: str, n_envs: int, config: FrankaEnvConfig | None = None, **env_kwargs: Any) -> EnvBatch:
    """``n_envs`` Franka ``task`` envs as an :class:`EnvBatch`, built from ``config``'s fields with ``env_kwargs``
    replacing some (they go to :func:`~policyserve.sim.make_env`)."""
    if n_envs < 1:
        raise ValueError(f"n_envs must be >= 1, got {n_envs}")
    if config is not None:
        env_kwargs = config.kwargs(**env_kwargs)
    return EnvBatch([_make_indexed_env(task, i, env_kwargs) for i in range(n_envs)])
