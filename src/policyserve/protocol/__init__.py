"""GR00T-compatible wire protocol: codec, server and client."""

from .client import PolicyClient
from .codec import packb, unpackb
from .server import PolicyServer

__all__ = ["PolicyClient", "PolicyServer", "packb", "unpackb"]
