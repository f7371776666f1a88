"""Vectorised Franka envs: 1..N sub-envs in-process or in worker processes, without the fork/GL hang."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv

from .envs import gl_context_created, make_env


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
    (sub-envs build their simulator lazily, so the parent never does) and "forkserver" once it does,
    since forking a process with a live GL context hangs; "forkserver"/"spawn" need the usual
    ``if __name__ == "__main__":`` guard in scripts.
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
        # shared_memory=False: gymnasium's shared-memory reader snapshots Text entries ("task") once.
        return AsyncVectorEnv(fns, context=context, autoreset_mode=mode, shared_memory=False)
    return SyncVectorEnv(fns, autoreset_mode=mode)


def restore_states(vec_env: gym.vector.VectorEnv, states: Mapping[int, dict[str, Any]]) -> tuple[dict, dict]:
    """Restore ``{sub-env index: state}`` into those sub-envs only; returns the batched (obs, info).

    Sub-envs not named keep running (gymnasium's ``reset_mask``).
    """
    mask = np.zeros(vec_env.num_envs, dtype=bool)
    mask[list(states)] = True
    return vec_env.reset(options={"reset_mask": mask, "states": dict(states)})
