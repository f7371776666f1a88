"""policyserve: serve, replay and evaluate robot policies over GR00T's ZeroMQ + msgpack protocol."""

from .errors import (
    ConfigError, PolicyServeError, PolicyTimeoutError, ProtocolError, ServerError, UnauthorizedError, ValidationError,
)
from .policies import BasePolicy, ConstantPolicy, Gr00tSimPolicyWrapper, PolicySpec, PolicyWrapper, SimPolicyWrapper
from .protocol import PolicyClient, PolicyServer
from .registry import (
    get_modality_configs, load_modality_config_file, register_modality_config, registered_embodiments,
)
from .types import (
    ActionConfig, ActionFormat, ActionRepresentation, ActionType, EmbodimentTag, ModalityConfig, ModalityDims,
)

__version__ = "0.1.0"

__all__ = [
    "ActionConfig", "ActionFormat", "ActionRepresentation", "ActionType", "BasePolicy", "ConfigError",
    "ConstantPolicy", "EmbodimentTag", "Gr00tSimPolicyWrapper", "ModalityConfig", "ModalityDims", "PolicyClient",
    "PolicyServeError", "PolicyServer", "PolicySpec", "PolicyTimeoutError", "PolicyWrapper", "ProtocolError", "ServerError",
    "SimPolicyWrapper", "UnauthorizedError", "ValidationError", "get_modality_configs", "load_modality_config_file",
    "register_modality_config", "registered_embodiments",
]
