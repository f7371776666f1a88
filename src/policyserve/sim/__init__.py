"""Built-in simulation: Franka Panda lift and stack on robosuite (MuJoCo), shaped like the seed's IsaacLab env.

Importing this package registers the gymnasium ids ``policyserve/FrankaLift-v0`` and
``policyserve/FrankaStack-v0`` and quiets robosuite's console chatter (see :func:`set_verbose`). The
robosuite env inside is built on the first ``reset``.
"""

from __future__ import annotations

from .verbosity import install_filter, is_verbose, set_verbose

install_filter()  # before anything imports robosuite: it warns at import time

from .envs import (  # noqa: E402
    GYM_IDS, TASKS, FrankaEnv, FrankaEnvConfig, FrankaLift, FrankaStack, make_env, register_envs,
)
from .render import RenderSettings  # noqa: E402
from .vector import make_vec_env, restore_states  # noqa: E402

register_envs()

__all__ = [
    "GYM_IDS", "TASKS", "FrankaEnv", "FrankaEnvConfig", "FrankaLift", "FrankaStack", "RenderSettings",
    "is_verbose", "make_env", "make_vec_env", "register_envs", "restore_states", "set_verbose",
]
