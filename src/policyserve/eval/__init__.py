"""policyserve.eval: rollouts and the model-vs-replay comparison in the Franka envs, over a PolicyDriver."""

from .compare import (
    ComparisonConfig, ComparisonResult, ModalityMismatchError, PolicyRoleError, check_demo_range, run_comparison,
)
from .envs import EnvConfig, batch_observations, make_envs
from .frames import compose_frame
from .rollout import EpisodeResult, RolloutConfig, RolloutReport, config_dict, run_rollout, wilson_interval

__all__ = [
    "ComparisonConfig", "ComparisonResult", "EnvConfig", "EpisodeResult", "ModalityMismatchError", "PolicyRoleError",
    "RolloutConfig", "RolloutReport", "batch_observations", "check_demo_range", "compose_frame", "config_dict",
    "make_envs", "run_comparison", "run_rollout", "wilson_interval",
]
