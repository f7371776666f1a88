"""Connecting to a policy server with a clear error when none answers."""

from __future__ import annotations

from typing import Any

from ..errors import PolicyServeError
from .policy_client import PolicyClient


class ServerUnavailableError(PolicyServeError, ConnectionError):
    """No policy server answered at the given address (or a managed server failed to start)."""


def connect_policy(host: str, port: int, *, api_token: str | None = None, timeout_ms: int = 15000,
                   ping_timeout_ms: int = 3000, role: str = "policy", **client_options: Any) -> PolicyClient:
    """A :class:`PolicyClient` to ``host:port`` that has answered a ping; else :class:`ServerUnavailableError`.

    ``client_options`` go to :class:`PolicyClient` (``max_reply_bytes``, ``curve_server_key``,
    ``curve_key_pair``, ``identity``).
    """
    client = PolicyClient(host, port, timeout_ms=ping_timeout_ms, api_token=api_token, **client_options)
    if not client.ping():
        client.close()
        raise ServerUnavailableError(
            f"no {role} server answering at tcp://{host}:{port} within {ping_timeout_ms} ms (is a policy server "
            f"running there? check host, port{' and api_token' if api_token else ''}"
            f"{' and the CURVE keys' if client_options.get('curve_server_key') is not None else ''})"
        )
    client.timeout_ms = timeout_ms
    return client
