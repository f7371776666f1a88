"""Connecting to a policy server with a clear error when none answers."""

from __future__ import annotations

from ..errors import PolicyServeError
from .policy_client import PolicyClient


class ServerUnavailableError(PolicyServeError, ConnectionError):
    """No policy server answered at the given address (or a managed server failed to start)."""


def connect_policy(host: str, port: int, *, api_token: str | None = None, timeout_ms: int = 15000,
                   ping_timeout_ms: int = 3000, role: str = "policy") -> PolicyClient:
    """A :class:`PolicyClient` to ``host:port`` that has answered a ping; else :class:`ServerUnavailableError`."""
    client = PolicyClient(host, port, timeout_ms=ping_timeout_ms, api_token=api_token)
    if not client.ping():
        client.close()
        raise ServerUnavailableError(
            f"no {role} server answering at tcp://{host}:{port} within {ping_timeout_ms} ms (is a policy server "
            f"running there? check host, port{' and api_token' if api_token else ''})"
        )
    client.timeout_ms = timeout_ms
    return client
