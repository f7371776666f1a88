"""Vectorised Franka envs: 1..N sub-envs in-process or in worker processes, without the fork/GL hang."""

from __future__ import annotations

import sys
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
