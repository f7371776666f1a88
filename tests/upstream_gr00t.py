"""GR00T N1.6's wire scheme as described in gr00t-protocol.md §1, for interoperability tests.

This is the *other side* of the protocol (np.save/np.load inside msgpack over plain REQ/REP), written
from the specification, so that tests can check our server against an upstream-style client and our
client against an upstream-style server. The benchmark uses it as its baseline.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import threading
from typing import Any, Callable

import msgpack
import numpy as np
import zmq


def _to_json_serializable(obj: Any) -> Any:
    """gr00t.data.utils.to_json_serializable: dataclass -> dict, Enum -> name, tuple -> list."""
    if dataclasses.is_dataclass(obj):
        return {k: _to_json_serializable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, enum.Enum):
        return obj.name
    if isinstance(obj, (list, tuple, set)):
        return [_to_json_serializable(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_json_serializable(v) for k, v in obj.items()}
    return obj


def _encode(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and type(obj).__name__ == "ModalityConfig":
        return {"__ModalityConfig_class__": True, "as_json": _to_json_serializable(obj)}
    if isinstance(obj, np.ndarray):
        buf = io.BytesIO()
        np.save(buf, obj, allow_pickle=False)
        return {"__ndarray_class__": True, "as_npy": buf.getvalue()}
    return obj


def _decode(obj: dict) -> Any:
    if "__ndarray_class__" in obj:
        return np.load(io.BytesIO(obj["as_npy"]), allow_pickle=False)
    if "__ModalityConfig_class__" in obj:
        return ("ModalityConfig", obj["as_json"])
    return obj


def to_bytes(obj: Any) -> bytes:
    return msgpack.packb(obj, default=_encode)


def from_bytes(data: bytes) -> Any:
    return msgpack.unpackb(data, object_hook=_decode)


class UpstreamClient:
    """GR00T ``PolicyClient.call_endpoint`` over a REQ socket (with a receive timeout for tests)."""

    def __init__(self, port: int, api_token: str | None = None, timeout_ms: int = 5000) -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.REQ)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVTIMEO, timeout_ms)
        self.socket.connect(f"tcp://127.0.0.1:{port}")
        self.api_token = api_token

    def call_endpoint(self, endpoint: str, data: dict | None = None, requires_input: bool = True) -> Any:
        request: dict[str, Any] = {"endpoint": endpoint}
        if requires_input:
            request["data"] = data
        if self.api_token:
            request["api_token"] = self.api_token
        self.socket.send(to_bytes(request))
        reply = self.socket.recv()
        if reply == b"ERROR":
            raise RuntimeError("Server error. Make sure we are running the correct policy server.")
        response = from_bytes(reply)
        if isinstance(response, dict) and "error" in response:
            raise RuntimeError(f"Server error: {response['error']}")
        return response

    def close(self) -> None:
        self.socket.close(0)
        self.context.term()


class UpstreamServer:
    """GR00T ``PolicyServer.run``: a sequential REP loop dispatching ``handler(**data)``."""

    def __init__(self, handlers: dict[str, Callable[..., Any]], api_token: str | None = None) -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.REP)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVTIMEO, 100)
        self.port = self.socket.bind_to_random_port("tcp://127.0.0.1")
        self.handlers = {"ping": lambda: {"status": "ok", "message": "Server is running"}, **handlers}
        self.api_token = api_token
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> UpstreamServer:
        self.thread.start()
        return self

    def _run(self) -> None:
        while self.running:
            try:
                message = self.socket.recv()
            except zmq.Again:
                continue
            try:
                request = from_bytes(message)
                if self.api_token is not None and request.get("api_token") != self.api_token:
                    self.socket.send(to_bytes({"error": "Unauthorized: Invalid API token"}))
                    continue
                endpoint = request.get("endpoint", "get_action")
                if endpoint == "kill":
                    self.running = False
                    self.socket.send(to_bytes(None))
                    break
                handler = self.handlers[endpoint]
                data = request.get("data") or {}
                result = handler(**data) if endpoint not in ("ping", "get_modality_config") else handler()
                self.socket.send(to_bytes(result))
            except Exception as exc:  # noqa: BLE001
                self.socket.send(to_bytes({"error": str(exc)}))
        self.socket.close(0)

    def stop(self) -> None:
        self.running = False
        self.thread.join(2)
