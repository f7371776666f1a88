"""policyserve: serve, replay and evaluate robot policies over GR00T's ZeroMQ + msgpack protocol."""

from .client import DriverConfig, KeyMap, PolicyDriver
from .errors import (
    ConfigError, PolicyServeError, PolicyTimeoutError, ProtocolError, ServerError, UnauthorizedError, ValidationError,
)
from .policies import BasePolicy, ConstantPolicy, Gr00tSimPolicyWrapper, PolicyWrapper, SimPolicyWrapper
from .policies.replay import ReplayPolicy
from .client.policy_client import PolicyClient
from .serving.server import PolicyServer, SchedulerConfig, ServerConfig
from .serving.spec import PolicySpec
from .wire.openpi_keys import OpenpiKeyMap
from .registry import (
    get_modality_configs, load_modality_config_file, register_modality_config, registered_embodiments,
)
from .types import (
    ActionConfig, ActionFormat, ActionRepresentation, ActionType, EmbodimentTag, ModalityConfig, ModalityDims,
)
from .serving.doors.base import FrontDoor
from .serving.doors.gr00t import Gr00tDoor

__version__ = "0.1.0"

_LAZY = {"OpenpiFrontDoor": "policyserve.serving.doors.openpi", "MetricsExporter": "policyserve.serving.doors.metrics"}
"""Exports whose modules need the ``serve`` extra (websockets, prometheus_client): imported on first use."""


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'policyserve' has no attribute {name!r}")


__all__ = [
    "ActionConfig", "ActionFormat", "ActionRepresentation", "ActionType", "BasePolicy", "ConfigError",
    "ConstantPolicy", "DriverConfig", "EmbodimentTag", "FrontDoor", "Gr00tDoor", "Gr00tSimPolicyWrapper", "KeyMap",
    "MetricsExporter", "ModalityConfig", "ModalityDims", "OpenpiFrontDoor", "OpenpiKeyMap", "PolicyClient",
    "PolicyDriver", "PolicyServeError", "PolicyServer", "PolicySpec", "PolicyTimeoutError", "PolicyWrapper",
    "ProtocolError", "ReplayPolicy", "SchedulerConfig", "ServerConfig", "ServerError", "SimPolicyWrapper", "UnauthorizedError", "ValidationError",
    "get_modality_configs", "load_modality_config_file", "register_modality_config", "registered_embodiments",
]
