"""Exception types raised across policyserve."""

from __future__ import annotations


class PolicyServeError(Exception):
    """Base class of every policyserve error."""


class ValidationError(PolicyServeError, ValueError):
    """An observation or action does not match the policy's modality config.

    The message names the modality, the key, the expected and the actual value.
    """

    def __init__(self, modality: str, key: str | None, expected: object, actual: object, what: str = ""):
        self.modality, self.key, self.expected, self.actual = modality, key, expected, actual
        where = f"{modality}[{key!r}]" if key is not None else modality
        detail = f" {what}" if what else ""
        super().__init__(f"{where}{detail}: expected {expected}, got {actual}")


class ProtocolError(PolicyServeError, ValueError):
    """A message could not be decoded or does not follow the wire protocol."""


class ServerError(PolicyServeError, RuntimeError):
    """The server answered with ``{"error": ...}``; ``message`` holds the server's text."""

    def __init__(self, message: str, endpoint: str | None = None):
        self.message, self.endpoint = message, endpoint
        where = f" ({endpoint})" if endpoint else ""
        super().__init__(f"Server error{where}: {message}")


class UnauthorizedError(ServerError):
    """The server refused the request's API token."""


class PolicyTimeoutError(PolicyServeError, TimeoutError):
    """No reply arrived within the client's ``timeout_ms``."""


class ConfigError(PolicyServeError, ValueError):
    """A modality config, embodiment tag or CLI option is invalid or unknown."""
