"""policyserve.client: next to the robot or the sim. ``policy_client.PolicyClient`` speaks GR00T's wire;
``driver.PolicyDriver`` turns batched env observations into env actions through it, with the env -> policy
key map (``keymap``), per-env history (``adapter``) and action-chunk queues (``chunking``); ``connect`` reaches
a server.

Needs only numpy, pyzmq and msgpack (torch tensors are accepted when torch is installed).
"""

from .adapter import EnvPolicyAdapter, HistoryBuffer
from .chunking import ActionChunker, ChunkingConfig, ChunkSyncError
from .connect import ServerUnavailableError, connect_policy
from .driver import DriverConfig, DriverStats, PolicyDriver
from .keymap import KeyMap, key_map_template

__all__ = [
    "ActionChunker", "ChunkSyncError", "ChunkingConfig", "DriverConfig", "DriverStats", "EnvPolicyAdapter",
    "HistoryBuffer", "KeyMap", "PolicyDriver", "ServerUnavailableError", "connect_policy", "key_map_template",
]
