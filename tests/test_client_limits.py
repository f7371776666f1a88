"""PolicyClient against careless or hostile servers: reply limits, decoding inside the timeout, ping that never
raises, partial modality configs, and one client identity across its own reconnects."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq

from policyserve.client.policy_client import DEFAULT_MAX_REPLY_BYTES, PolicyClient
from policyserve.errors import PolicyTimeoutError, ProtocolError, ServerError
from policyserve.policies.replay import make_replay_policy
from policyserve.serving.server import PolicyServer
from policyserve.types import ModalityConfig
from policyserve.wire.gr00t import packb

from upstream_gr00t import UpstreamServer


class RawRepServer:
    """A REP server answering every request with ``reply(request_bytes)`` (raw bytes, any content)."""

    def __init__(self, reply: Callable[[bytes], bytes]) -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.REP)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.port = self.socket.bind_to_random_port("tcp://127.0.0.1")
        self.reply = reply
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.socket.poll(50):
                self.socket.send(self.reply(self.socket.recv()))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.socket.close(0)
        self.context.term()


@pytest.fixture()
def raw_server() -> Iterator[Callable[[Callable[[bytes], bytes]], RawRepServer]]:
    servers: list[RawRepServer] = []

    def start(reply: Callable[[bytes], bytes]) -> RawRepServer:
        servers.append(RawRepServer(reply))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def bomb(size: int) -> bytes:
    """A tree of 15-wide arrays of empty arrays, about ``size`` bytes."""
    node = b"\x90"
    while len(node) * 15 < size:
        node = b"\x9f" + node * 15
    count = size // len(node)
    return bytes([0x90 | count]) + node * count


@pytest.mark.parametrize("reply", [b"ERROR", packb({"error": "boom"}), packb({"error": "Unauthorized: no"}),
                                   b"\xc1 not msgpack", bomb(1 << 20)])
def test_ping_is_false_on_any_failure(raw_server, reply: bytes) -> None:
    server = raw_server(lambda _: reply)
    with PolicyClient("127.0.0.1", server.port, timeout_ms=3000) as client:
        assert client.ping() is False
    with pytest.raises(ServerError if reply == b"ERROR" else Exception):
        with PolicyClient("127.0.0.1", server.port, timeout_ms=3000) as client:
            client.call_endpoint("ping", requires_input=False)


def test_ping_is_false_without_a_server_and_when_closed(raw_server) -> None:
    port = raw_server(lambda _: packb({"status": "ok"})).port
    client = PolicyClient("127.0.0.1", port, timeout_ms=3000)
    assert client.ping()
    client.close()
    assert client.ping() is False
    with zmq.Context() as ctx, ctx.socket(zmq.REP) as sock:
        free = sock.bind_to_random_port("tcp://127.0.0.1")
    with PolicyClient("127.0.0.1", free, timeout_ms=200) as nobody:
        start = time.monotonic()
        assert nobody.ping() is False
        assert time.monotonic() - start < 5


def test_reply_over_max_reply_bytes_is_dropped_and_the_client_recovers(raw_server) -> None:
    big = packb(np.zeros(2 << 20, np.uint8))
    server = raw_server(lambda request: big if b"get_action" in request else packb({"status": "ok"}))
    with PolicyClient("127.0.0.1", server.port, timeout_ms=1000, max_reply_bytes=1 << 20) as client:
        assert client.max_reply_bytes == 1 << 20
        with pytest.raises(PolicyTimeoutError, match="max_reply_bytes=1048576"):
            client.call_endpoint("get_action", {})
        assert client.ping()  # the socket was replaced; small replies still come through
    with PolicyClient("127.0.0.1", server.port, timeout_ms=5000, max_reply_bytes=4 << 20) as roomy:
        assert roomy.call_endpoint("get_action", {}).nbytes == 2 << 20
    assert PolicyClient.__init__.__kwdefaults__["max_reply_bytes"] == DEFAULT_MAX_REPLY_BYTES == 256 << 20


def test_a_bomb_reply_is_refused_inside_the_timeout(raw_server) -> None:
    server = raw_server(lambda _: bomb(8 << 20))  # issue 17: took 5.9 s with timeout_ms=3000
    with PolicyClient("127.0.0.1", server.port, timeout_ms=3000) as client:
        start = time.monotonic()
        with pytest.raises(ProtocolError, match="message too complex"):
            client.call_endpoint("get_action", {})
        assert time.monotonic() - start < 3.0


def test_server_error_text_is_escaped_and_truncated(raw_server) -> None:
    server = raw_server(lambda _: packb({"error": "\x1b[2J\nforged line " * 1000}))
    with PolicyClient("127.0.0.1", server.port, timeout_ms=3000) as client:
        with pytest.raises(ServerError) as info:
            client.reset()
    text = str(info.value)
    assert "\x1b" not in text and "\n" not in text and len(text) < 2200


ACTION_ONLY = ModalityConfig(delta_indices=list(range(16)), modality_keys=["arm", "gripper"])


@pytest.mark.parametrize("declared", [{"action": ACTION_ONLY}, {}])
def test_modality_config_returns_what_an_upstream_server_declares(declared: dict) -> None:
    server = UpstreamServer({"get_modality_config": lambda: declared}).start()
    try:
        with PolicyClient("127.0.0.1", server.port, timeout_ms=5000) as client:
            configs = client.get_modality_config()
            assert configs == declared
            assert set(configs) == set(declared)
    finally:
        server.stop()


def test_a_malformed_modality_config_names_the_modality() -> None:
    server = UpstreamServer({"get_modality_config": lambda: {"action": {"delta_indices": []}}}).start()
    try:
        with PolicyClient("127.0.0.1", server.port, timeout_ms=5000) as client:
            with pytest.raises(ProtocolError, match="modality 'action'"):
                client.get_modality_config()
    finally:
        server.stop()


def test_replay_cursor_survives_a_timeout_and_reconnect(gr1_dataset_path: Path) -> None:
    """Issue 16: after a PolicyTimeoutError the same client continues its episode (not episode 0, step 0)."""
    policy = make_replay_policy(gr1_dataset_path, 8)
    slow, entered = threading.Event(), threading.Event()
    serve_batch = policy.serve_batch

    def slowed(requests):  # the real replay policy, made slow on demand
        if slow.is_set():
            entered.set()
            time.sleep(1.5)
        return serve_batch(requests)

    policy.serve_batch = slowed
    server = PolicyServer(policy, host="127.0.0.1", port=0, verbose=False)
    port = server.start()
    client = PolicyClient("127.0.0.1", port, timeout_ms=10000)
    try:
        identity = client.identity
        assert client.reset({"episode_index": 2, "step_index": 8})["current_step"] == 8
        assert client.get_action(None, {"batch_size": 1})[1]["current_step"] == 8
        slow.set()
        with pytest.raises(PolicyTimeoutError):
            client.send_request({"endpoint": "get_action", "data": {"observation": None,
                                                                    "options": {"batch_size": 1}}}, timeout_ms=500)
        assert entered.wait(10)  # the timed-out request reached the policy (bounded wait, no race)
        slow.clear()
        assert client.identity == identity
        # the timed-out request (step 16) still ran on the server; its late reply is dropped, not taken as ours
        _, info = client.get_action(None, {"batch_size": 1})
        assert (info["episode_index"], info["current_step"]) == (2, 24)
        _, info = client.get_action(None, {"batch_size": 1})
        assert (info["episode_index"], info["current_step"]) == (2, 32)
    finally:
        client.close()
        server.stop()


def test_each_client_has_its_own_identity() -> None:
    a, b = PolicyClient("127.0.0.1", 1), PolicyClient("127.0.0.1", 1, identity=b"robot-7")
    try:
        assert a.identity != PolicyClient("127.0.0.1", 1).identity and b.identity == b"robot-7"
    finally:
        a.close()
        b.close()
