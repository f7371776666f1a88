"""policyserve.client: the client-side layer for env loops: PolicyDriver, env<->policy adapter, action queues.

Needs only numpy, pyzmq and msgpack (torch tensors are accepted when torch is installed).
"""

from .adapter import EnvPolicyAdapter, HistoryBuffer, KeyMap
from .chunking import ActionChunker, ChunkingConfig, ChunkSyncError
from .connect import ServerUnavailableError, connect_policy
from .driver import DriverConfig, DriverStats, PolicyDriver

__all__ = [
    "ActionChunker", "ChunkSyncError", "ChunkingConfig", "DriverConfig", "DriverStats", "EnvPolicyAdapter",
    "HistoryBuffer", "KeyMap", "PolicyDriver", "ServerUnavailableError", "connect_policy",
]
