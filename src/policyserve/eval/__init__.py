"""policyserve.eval: rollouts and the model-vs-replay comparison in the Franka envs, over a PolicyDriver;
in one process or on Ray workers (``distributed``, which imports Ray only when a run starts)."""

from .compare import (
    ComparisonConfig, ComparisonResult, ModalityMismatchError, PolicyRoleError, run_comparison,
)
from .compare_all import AggregateComparison, DemoSummary, run_all_comparisons
from .distributed import DistributedConfig, DistributedError, ServerAddress, run_distributed_comparisons, \
    run_distributed_rollout
from .envs import EnvConfig, make_envs
from .frames import compose_frame
from .identity import IdentityError, check_replay_identity, demo_env_settings, demo_reset_options
from .rollout import (
    EpisodeResult, RolloutConfig, RolloutReport, RolloutRunner, config_dict, run_rollout, wilson_interval,
)

__all__ = [
    "AggregateComparison", "DemoSummary", "DistributedConfig", "DistributedError", "RolloutRunner", "ServerAddress",
    "run_all_comparisons", "run_distributed_comparisons", "run_distributed_rollout",
    "ComparisonConfig", "ComparisonResult", "EnvConfig", "EpisodeResult", "ModalityMismatchError", "PolicyRoleError",
    "IdentityError", "RolloutConfig", "RolloutReport", "check_replay_identity", "compose_frame", "config_dict",
    "demo_env_settings", "demo_reset_options",
    "make_envs", "run_comparison", "run_rollout", "wilson_interval",
]
