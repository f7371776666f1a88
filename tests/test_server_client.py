"""Server and client over real ZeroMQ sockets on loopback."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import msgpack
import numpy as np
import pytest
import zmq

from policyserve import (
    ConstantPolicy, PolicyClient, PolicyServer, PolicyTimeoutError, ServerError, UnauthorizedError,
)
from policyserve.policies.base import BasePolicy
from policyserve.serving.server import AddressInUseError
from policyserve.wire.gr00t import packb, unpackb
from policyserve.registry import get_embodiment_spec

from helpers import franka_observation
from upstream_gr00t import UpstreamClient, UpstreamServer

SPEC = get_embodiment_spec("franka_panda")


class SlowPolicy(ConstantPolicy):
    """Sleeps in get_action so concurrency can be observed."""

    def __init__(self, delay: float) -> None:
        super().__init__(SPEC.modality_configs, SPEC.dims)
        self.delay = delay
        self.started = threading.Event()

    def _get_action(self, observation, options=None):
        self.started.set()
        time.sleep(self.delay)
        return super()._get_action(observation, options)


class ResettablePolicy(ConstantPolicy):
    def reset(self, options=None):
        return {"reset_with": options}


@pytest.fixture
def server():
    srv = PolicyServer(ResettablePolicy(SPEC.modality_configs, SPEC.dims), port=0, verbose=False)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    with PolicyClient(port=server.port, timeout_ms=3000) as c:
        yield c


def raw_request(port: int, payload: bytes, timeout_ms: int = 3000) -> object:
    """Send raw bytes over a bare REQ socket and decode the reply."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
    sock.connect(f"tcp://127.0.0.1:{port}")
    try:
        sock.send(payload)
        return unpackb(sock.recv())
    finally:
        sock.close(0)
        ctx.term()


# -- endpoints -------------------------------------------------------------------------------------
def test_every_endpoint_round_trips(client):
    assert client.ping() is True
    assert client.call_endpoint("ping", requires_input=False) == {"status": "ok", "message": "Server is running"}
    configs = client.get_modality_config()
    assert configs["action"].modality_keys == ["arm", "gripper"]
    action, info = client.get_action(franka_observation(batch=3))
    assert action["arm"].shape == (3, 16, 6) and action["arm"].dtype == np.float32
    assert action["gripper"].shape == (3, 16, 1)
    assert action["arm"].flags.writeable
    timing = info["server_timing"]
    assert timing["recv_to_reply_ms"] >= timing["policy_ms"] >= 0
    assert client.reset({"episode_index": 2}) == {"reset_with": {"episode_index": 2}}
    assert client.reset() == {"reset_with": None}


def test_missing_endpoint_defaults_to_get_action(server):
    reply = raw_request(server.port, packb({"data": {"observation": franka_observation(), "options": None}}))
    assert isinstance(reply, list) and reply[0]["arm"].shape == (1, 16, 6)


def test_custom_endpoint(server, client):
    server.register_endpoint("add", lambda a, b: a + b)
    server.register_endpoint("version", lambda: "1.2", requires_input=False)
    assert client.call_endpoint("add", {"a": 2, "b": 3}) == 5
    assert client.call_endpoint("version", requires_input=False) == "1.2"


def test_kill_stops_the_server():
    srv = PolicyServer(ConstantPolicy(SPEC.modality_configs, SPEC.dims), port=0, verbose=False)
    srv.start()
    with PolicyClient(port=srv.port, timeout_ms=2000) as c:
        assert c.kill_server() is None
        srv._thread.join(5)
        assert not srv._thread.is_alive()
        c.timeout_ms = 300
        assert c.ping() is False


# -- authentication ----------------------------------------------------------------------------------
def test_token_required_on_every_endpoint_including_kill():
    srv = PolicyServer(ConstantPolicy(SPEC.modality_configs, SPEC.dims), port=0, api_token="s3cret", verbose=False)
    srv.start()
    try:
        with PolicyClient(port=srv.port, timeout_ms=2000) as anonymous, \
                PolicyClient(port=srv.port, timeout_ms=2000, api_token="wrong") as wrong:
            for c in (anonymous, wrong):
                assert c.ping() is False  # ping() says False on any failure (issue 17)
                with pytest.raises(UnauthorizedError, match="Unauthorized"):
                    c.call_endpoint("ping", requires_input=False)
                with pytest.raises(UnauthorizedError):
                    c.get_action(franka_observation())
                with pytest.raises(UnauthorizedError):
                    c.kill_server()
            assert srv._thread.is_alive()
        with PolicyClient(port=srv.port, timeout_ms=2000, api_token="s3cret") as good:
            assert good.ping()
            good.kill_server()
        srv._thread.join(5)
        assert not srv._thread.is_alive()
    finally:
        srv.stop()


def test_non_string_token_is_unauthorized(server):
    srv = PolicyServer(ConstantPolicy(SPEC.modality_configs, SPEC.dims), port=0, api_token="t", verbose=False)
    srv.start()
    try:
        reply = raw_request(srv.port, packb({"endpoint": "ping", "api_token": 12345}))
        assert reply == {"error": "Unauthorized: Invalid API token"}
    finally:
        srv.stop()


def _pickled_npy() -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    return buf.getvalue()


# -- bad input over a raw socket: clear error, and the next good request still succeeds ---------------
BAD_INPUTS = [
    (b"\x00\xffnot msgpack at all", "must be a msgpack map"),
    (packb({"endpoint": "ping", "data": {"x": np.zeros(64)}})[:-9], "could not decode"),
    (msgpack.packb({"endpoint": "get_action", "data": {"observation": {"__ndarray_class__": True,
                                                                      "as_npy": b"\x80\x04\x95pickle"}}}),
     "NPY format"),
    (msgpack.packb({"endpoint": "get_action", "data": {"observation": {"__ndarray_class__": True,
                    "as_npy": _pickled_npy()}}}), "object-dtype"),
    (packb({"endpoint": "does_not_exist"}), "Unknown endpoint: does_not_exist"),
    (packb([1, 2, 3]), "must be a msgpack map"),
    (packb({"endpoint": "get_action", "data": "oops"}), "must be a map"),
    (packb({"endpoint": "get_action", "data": {"observation": franka_observation(state_dim_override={"eef_pos": 5}),
                                               "options": None}}), "state['eef_pos']: expected dimension D=3, got D=5"),
    (packb({"endpoint": "get_action", "data": {"observation": {"video": {}}, "options": None}}),
     "video['ego_view'] missing"),
    (packb({"endpoint": "get_action", "data": {"bogus": 1}}), "got unexpected 'bogus'"),
    (msgpack.packb({"endpoint": "get_action", "data": {"observation": {7: np.zeros(3).tolist()}}}),
     "map keys must be strings, got a int key"),
]


@pytest.mark.parametrize("payload, message", BAD_INPUTS)
def test_bad_input_is_answered_and_server_keeps_serving(server, client, payload, message):
    reply = raw_request(server.port, payload)
    assert isinstance(reply, dict) and message in reply["error"]
    assert client.get_action(franka_observation())[0]["arm"].shape == (1, 16, 6)


def test_frame_over_size_limit_is_refused():
    srv = PolicyServer(ConstantPolicy(SPEC.modality_configs, SPEC.dims), port=0, verbose=False,
                       max_message_bytes=100_000, hard_limit_bytes=1_000_000)
    srv.start()
    try:
        big = packb({"endpoint": "ping", "data": {"blob": np.zeros(200_000, np.uint8)}})
        reply = raw_request(srv.port, big)
        assert "exceeds the server's max_message_bytes=100000" in reply["error"]
        # Over the hard limit libzmq drops the frame without allocating it; that peer gets no reply...
        huge = packb({"endpoint": "ping", "data": {"blob": np.zeros(2_000_000, np.uint8)}})
        with pytest.raises(zmq.Again):
            raw_request(srv.port, huge, timeout_ms=500)
        # ...and everyone else is still served.
        with PolicyClient(port=srv.port, timeout_ms=2000) as c:
            assert c.ping()
    finally:
        srv.stop()


def test_server_error_raises_with_server_message(client):
    with pytest.raises(ServerError, match=r"state\['eef_pos'\].*D=3, got D=4") as info:
        client.get_action(franka_observation(state_dim_override={"eef_pos": 4}))
    assert info.value.endpoint == "get_action"


# -- timeouts and concurrency ------------------------------------------------------------------------
def _start_on_port(port: int, wait_s: float = 5.0) -> PolicyServer:
    """Start a server on ``port``, retrying while libzmq finishes releasing it (closing is asynchronous)."""
    deadline = time.monotonic() + wait_s
    while True:
        srv = PolicyServer(ConstantPolicy(SPEC.modality_configs, SPEC.dims), port=port, verbose=False)
        try:
            srv.start()
            return srv
        except AddressInUseError:
            assert srv.closed  # a failed bind leaves nothing open
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_client_timeout_against_silent_server_then_next_call_works():
    ctx = zmq.Context()
    silent = ctx.socket(zmq.ROUTER)  # accepts requests and never answers
    silent.setsockopt(zmq.LINGER, 0)
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    try:
        with PolicyClient(port=port, timeout_ms=300) as c:
            start = time.perf_counter()
            with pytest.raises(PolicyTimeoutError, match="within 300 ms"):
                c.get_action(franka_observation())
            assert time.perf_counter() - start < 1.0
            assert isinstance(PolicyTimeoutError("x"), TimeoutError)
            # The socket was reset: a new request is sent (not EFSM) and times out again cleanly.
            start = time.perf_counter()
            assert c.ping() is False
            assert time.perf_counter() - start < 1.0
            # Once a real server answers on that port, the same client works.
            silent.unbind(silent.getsockopt_string(zmq.LAST_ENDPOINT))
            silent.close(0)
            srv = _start_on_port(port)
            try:
                c.timeout_ms = 3000
                assert c.ping() is True
            finally:
                srv.stop()
    finally:
        silent.close(0)
        ctx.term()


def test_no_server_ping_is_false_and_process_exits_promptly():
    code = (
        "import time; from policyserve import PolicyClient\n"
        "c = PolicyClient(host='127.0.0.1', port=1, timeout_ms=500)\n"
        "t = time.perf_counter(); ok = c.ping(); print(ok, round(time.perf_counter() - t, 2))\n"
        "c2 = PolicyClient(host='127.0.0.1', port=1, timeout_ms=200)\n"  # left open: must not block exit
    )
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    elapsed = time.perf_counter() - start
    assert out.returncode == 0, out.stderr
    ok, took = out.stdout.split()
    assert ok == "False" and float(took) < 1.5
    assert elapsed < 15


class GatedPolicy(SlowPolicy):
    """Calls wait until ``gate`` is set (``started`` is set once one has begun): tests hold the worker in a call
    deterministically instead of sleeping."""

    def __init__(self) -> None:
        super().__init__(delay=0.0)
        self.gate = threading.Event()

    def _get_action(self, observation, options=None):
        self.started.set()
        assert self.gate.wait(30), "gate never opened"
        return super()._get_action(observation, options)


def _wait_for(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.002)


def test_slow_get_action_does_not_block_another_clients_ping():
    policy = GatedPolicy()
    srv = PolicyServer(policy, port=0, verbose=False)
    srv.start()
    try:
        results = {}

        def slow_call():
            with PolicyClient(port=srv.port, timeout_ms=5000) as c:
                results["action"] = c.get_action(franka_observation())[0]

        t = threading.Thread(target=slow_call)
        t.start()
        assert policy.started.wait(30)
        with PolicyClient(port=srv.port, timeout_ms=10000) as fast:  # answered while the call is held
            assert fast.ping()
            assert fast.get_modality_config()["state"].modality_keys == ["eef_pos", "eef_quat", "gripper_pos"]
            assert not policy.gate.is_set() and t.is_alive()
        policy.gate.set()
        t.join(30)
        assert results["action"]["arm"].shape == (1, 16, 6)
    finally:
        srv.stop()


def test_requests_from_many_clients_are_batched_into_one_policy_call():
    class CountingPolicy(ConstantPolicy):
        def __init__(self):
            super().__init__(SPEC.modality_configs, SPEC.dims)
            self.batch_sizes = []
            self.gate = threading.Event()

        def _get_action(self, observation, options=None):
            self.batch_sizes.append(observation["state"]["eef_pos"].shape[0])
            assert self.gate.wait(30), "gate never opened"
            action, info = super()._get_action(observation, options)
            action["arm"][:] = observation["state"]["eef_pos"][:, :, :1]  # echo input so splitting is checked
            return action, info

    policy = CountingPolicy()
    srv = PolicyServer(policy, port=0, verbose=False)
    srv.start()
    try:
        outputs = {}

        def call(i):
            with PolicyClient(port=srv.port, timeout_ms=5000) as c:
                obs = franka_observation(batch=i + 1)
                obs["state"]["eef_pos"][:] = i
                outputs[i] = c.get_action(obs)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
        threads[0].start()  # its call holds the worker (gate) while the three others queue
        _wait_for(lambda: policy.batch_sizes == [1], "client 0's call started")
        for t in threads[1:]:
            t.start()
        _wait_for(lambda: srv.scheduler.queued == 3, "the three other requests are queued")
        policy.gate.set()
        for t in threads:
            t.join(30)
        assert sorted(outputs) == [0, 1, 2, 3]
        for i, (action, info) in outputs.items():
            assert action["arm"].shape == (i + 1, 16, 6)
            assert np.all(action["arm"] == i)
        assert policy.batch_sizes == [1, 2 + 3 + 4]
        assert max(info["server_timing"]["merged_requests"] for _, info in outputs.values()) > 1
    finally:
        srv.stop()


# -- interoperability with GR00T's scheme --------------------------------------------------------------
def test_upstream_style_client_uses_our_server(server):
    c = UpstreamClient(server.port)
    try:
        assert c.call_endpoint("ping", requires_input=False) == {"status": "ok", "message": "Server is running"}
        action, info = c.call_endpoint("get_action", {"observation": franka_observation(2), "options": None})
        assert action["arm"].shape == (2, 16, 6)
        configs = c.call_endpoint("get_modality_config", requires_input=False)
        assert configs["action"][0] == "ModalityConfig" and configs["action"][1]["modality_keys"] == ["arm", "gripper"]
        with pytest.raises(RuntimeError, match="Unknown endpoint"):
            c.call_endpoint("nope", requires_input=False)
    finally:
        c.close()


def test_our_client_uses_upstream_style_server():
    config = SPEC.modality_configs
    seen = {}

    def get_action(observation, options=None):
        seen["obs"] = observation
        return [{"arm": np.ones((2, 16, 6), np.float32)}, {}]

    upstream = UpstreamServer({"get_action": get_action, "reset": lambda options=None: {"ok": True},
                               "get_modality_config": lambda: {m: c for m, c in config.items()}},
                              api_token="tok").start()
    try:
        with PolicyClient(port=upstream.port, timeout_ms=3000, api_token="tok") as c:
            assert c.ping()
            action, info = c.get_action(franka_observation(2))
            assert action["arm"].shape == (2, 16, 6) and info == {}
            np.testing.assert_array_equal(seen["obs"]["state"]["eef_pos"], franka_observation(2)["state"]["eef_pos"])
            assert c.reset() == {"ok": True}
            assert c.get_modality_config()["action"].modality_keys == ["arm", "gripper"]
            c.kill_server()
    finally:
        upstream.stop()


def test_strict_client_validates_locally(server):
    with PolicyClient(port=server.port, timeout_ms=3000, strict=True) as c:
        from policyserve.errors import ValidationError

        with pytest.raises(ValidationError, match=r"video\['wrist_view'\]"):
            obs = franka_observation()
            del obs["video"]["wrist_view"]
            c.get_action(obs)
        assert c.get_action(franka_observation())[0]["arm"].shape == (1, 16, 6)
