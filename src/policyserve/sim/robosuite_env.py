"""robosuite task envs whose observations are a function of the MuJoCo state alone.

robosuite samples its observables inside ``step`` on per-observable timers
(``Observable._time_since_last_sample`` / ``_sampled``). Every forced update (each reset, each restore)
also advances those timers by one physics substep, and ``Observable.reset`` does not clear
``_sampled``, so the substep a step's observation is taken at depends on how many resets and forced
updates the env went through, and is part of no saved state: an env restored from a state then
samples at another substep than the run that saved it (joint velocities off by up to 0.1 rad/s,
pixels by up to 240).

Here observables are sampled only on demand: once at the end of every step, after re-running the
kinematics of the final physics state (a step's last ``mj_step`` leaves body poses one substep behind
the joints). An observation is then exactly what restoring the state and calling :func:`observe`
gives. Physics is unchanged: the next step recomputes everything ``mj_forward`` computes.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Any


class StateObservations:
    """robosuite ``MujocoEnv`` mixin: observations sampled from the state each step ends in."""

    def _update_observables(self, force: bool = False) -> None:
        if force:  # in-step (timer driven) updates are skipped: observe() samples once per step
            super()._update_observables(force=True)  # type: ignore[misc]

    def observe(self) -> OrderedDict:
        """Every enabled observable, sampled from the current MuJoCo state (fresh kinematics, empty cache)."""
        self.sim.forward()  # type: ignore[attr-defined]
        self._obs_cache = {}
        return self._get_observations(force_update=True)  # type: ignore[attr-defined]

    def step(self, action: Any) -> tuple[OrderedDict, float, bool, dict]:
        _, reward, done, info = super().step(action)  # type: ignore[misc]
        return self.observe(), reward, done, info


@functools.cache
def env_class(name: str) -> type:
    """The robosuite env class ``name`` (e.g. "Lift") with :class:`StateObservations` mixed in."""
    from robosuite.environments.base import REGISTERED_ENVS

    try:
        base = REGISTERED_ENVS[name]
    except KeyError:
        raise ValueError(f"unknown robosuite env {name!r}") from None
    # robosuite's metaclass registers the subclass too (as "PolicyserveLift", ...): harmless.
    return type(f"Policyserve{name}", (StateObservations, base), {})


def make(name: str, **kwargs: Any) -> Any:
    """``robosuite.make(name, **kwargs)`` for the :class:`StateObservations` variant of env ``name``."""
    return env_class(name)(**kwargs)
