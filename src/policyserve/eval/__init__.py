"""policyserve.eval: env<->policy adapter, chunked rollouts, model-vs-replay comparison and the end-to-end demo."""

from .adapter import EnvPolicyAdapter, HistoryBuffer, KeyMap
from .chunking import ActionChunker, ChunkingConfig
from .compare import (
    ComparisonConfig, ComparisonResult, ModalityMismatchError, ReplaySyncError, check_demo_range, run_comparison,
)
from .rollout import EpisodeResult, RolloutConfig, RolloutReport, run_rollout, wilson_interval
from .servers import ServerProcess, ServerUnavailableError, connect_policy, free_port
from .video import VideoWriter, compose_frame

__all__ = [
    "ActionChunker", "ChunkingConfig", "ComparisonConfig", "ComparisonResult", "EnvPolicyAdapter", "EpisodeResult",
    "HistoryBuffer", "KeyMap", "ModalityMismatchError", "ReplaySyncError", "RolloutConfig", "RolloutReport", "ServerProcess",
    "ServerUnavailableError", "VideoWriter", "check_demo_range", "compose_frame", "connect_policy", "free_port",
    "run_comparison", "run_rollout", "wilson_interval",
]
