"""Built-in simulation: Franka Panda lift and stack on robosuite (MuJoCo), shaped like the seed's IsaacLab env.

Importing this package registers the gymnasium ids ``policyserve/FrankaLift-v0`` and
``policyserve/FrankaStack-v0``. The robosuite env inside is built on the first ``reset``.
"""

from __future__ import annotations

from .envs import GYM_IDS, TASKS, FrankaEnv, FrankaEnvConfig, FrankaLift, FrankaStack, make_env, register_envs
from .render import RenderSettings
from .vector import make_vec_env, restore_states

register_envs()

__all__ = [
    "GYM_IDS", "TASKS", "FrankaEnv", "FrankaEnvConfig", "FrankaLift", "FrankaStack", "RenderSettings",
    "make_env", "make_vec_env", "register_envs", "restore_states",
]
