"""Serving under load: continuous batching, per-client limits, round-robin fairness, clean shutdown.

Every test starts a real ZeroMQ server on loopback and talks to it with real clients (REQ through
PolicyClient, DEALER for pipelining); every wait is bounded.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from policyserve import ConstantPolicy, PolicyClient, PolicyServer, ServerError, SimPolicyWrapper
from policyserve.policies.base import ActionRequest
from policyserve.wire.gr00t import packb, unpackb
from policyserve.serving.events import SchedulerListener
from policyserve.serving.server import AddressInUseError
from policyserve.registry import get_embodiment_spec

from helpers import Dealer, SlowPolicy, concurrently, franka_observation, marked_observation
from serve_process import serve_process

SPEC = get_embodiment_spec("franka_panda")


class GatedPolicy(SlowPolicy):
    """:class:`SlowPolicy` whose calls wait while ``gate`` is clear; ``entered`` counts the calls that started.
    Tests hold the worker in a call with it and wait (bounded) for the state they assert on, so they never
    race the worker."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__(delay=delay)
        self.gate = threading.Event()
        self.entered = 0

    def _get_action(self, observation, options=None):
        with self.lock:
            self.entered += 1
        assert self.gate.wait(30), "gate never opened"
        return super()._get_action(observation, options)


def wait_for(condition, what: str, timeout: float = 30.0) -> None:
    """Wait (bounded) until ``condition()`` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.002)


def loopback_queues_empty(port: int) -> bool:
    """True when no TCP connection to or from ``port`` on this machine has bytes in its send or receive queue
    (read from /proc/net/tcp)."""
    hex_port = f"{port:04X}"
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local, remote, queues = fields[1], fields[2], fields[4]
            if hex_port in (local.rsplit(":", 1)[1], remote.rsplit(":", 1)[1]) and queues != "00000000:00000000":
                return False
    return True


def start(policy, **kwargs) -> PolicyServer:
    server = PolicyServer(policy, port=0, verbose=False, **kwargs)
    server.start()
    return server


# -- continuous batching -----------------------------------------------------------------------------------
def test_continuous_batching_merges_waiting_requests_without_a_window():
    policy = GatedPolicy()
    server = start(policy)  # batch_window_ms=0: only requests that queue during a call are merged
    try:
        clients = [PolicyClient(port=server.port, timeout_ms=30000) for _ in range(5)]

        def call(i):
            if i:  # arrive while client 0's call is running
                wait_for(lambda: policy.entered >= 1, "client 0's call started")
            return clients[i].get_action(marked_observation(i, batch=i + 1))

        def release():
            wait_for(lambda: server.scheduler.queued == 4, "the 4 other requests are queued")
            policy.gate.set()

        replies = concurrently([lambda i=i: call(i) for i in range(5)] + [release], timeout=60)[:5]
        for i, (action, info) in enumerate(replies):
            assert action["arm"].shape == (i + 1, 16, 6) and np.all(action["arm"] == i)
            assert "queue_ms" in info["server_timing"] and "policy_ms" in info["server_timing"]
        assert replies[0][1]["server_timing"]["merged_requests"] == 1  # the lone first client waited for nobody
        assert {r[1]["server_timing"]["merged_requests"] for r in replies[1:]} == {4}
        assert [rows for what, _, rows in policy.log] == [1, 2 + 3 + 4 + 5]
        for c in clients:
            c.close()
    finally:
        server.stop(10)


def test_max_batch_size_one_turns_merging_off():
    policy = SlowPolicy(delay=0.05)
    server = start(policy, max_batch_size=1, batch_window_ms=100)
    try:
        with PolicyClient(port=server.port) as a, PolicyClient(port=server.port) as b:
            replies = concurrently([lambda: a.get_action(marked_observation(1)),
                                    lambda: b.get_action(marked_observation(2))])
        assert [r[1]["server_timing"]["merged_requests"] for r in replies] == [1, 1]
        assert len(policy.log) == 2
    finally:
        server.stop(10)


def test_requests_with_different_options_are_grouped_by_equal_options():
    policy = SlowPolicy(delay=0.05)
    server = start(policy, batch_window_ms=300)
    try:
        clients = [PolicyClient(port=server.port) for _ in range(4)]
        options = [{"mode": "a"}, {"mode": "b"}, {"mode": "a"}, {"mode": "b"}]
        replies = concurrently([lambda i=i: clients[i]._get_action(marked_observation(i), options[i])
                                for i in range(4)])
        for i, (action, info) in enumerate(replies):
            assert np.all(action["arm"] == i)
            assert info["server_timing"]["merged_requests"] == 2
        assert sorted(rows for _, _, rows in policy.log) == [2, 2]
        for c in clients:
            c.close()
    finally:
        server.stop(10)


def test_stateful_replay_like_policy_is_never_merged():
    policy = SlowPolicy(delay=0.05, batchable=False)
    server = start(policy, batch_window_ms=200)
    try:
        clients = [PolicyClient(port=server.port) for _ in range(3)]
        replies = concurrently([lambda i=i: clients[i].get_action(marked_observation(i)) for i in range(3)])
        assert all(r[1]["server_timing"]["merged_requests"] == 1 for r in replies)
        assert [rows for _, _, rows in policy.log] == [1, 1, 1]
        for c in clients:
            c.close()
    finally:
        server.stop(10)


def test_sim_wrapper_over_a_batchable_policy_merges_flat_observations():
    inner = SlowPolicy(delay=0.05)
    wrapper = SimPolicyWrapper(inner)
    assert wrapper.batchable
    server = start(wrapper, batch_window_ms=300)
    try:
        def flat(i):
            nested = marked_observation(i)
            out = {f"{m}.{k}": v for m in ("video", "state") for k, v in nested[m].items()}
            out["annotation.human.action.task_description"] = ["lift the cube"]
            return out

        clients = [PolicyClient(port=server.port) for _ in range(3)]
        replies = concurrently([lambda i=i: clients[i].get_action(flat(i)) for i in range(3)])
        for i, (action, info) in enumerate(replies):
            assert action["action.arm"].shape == (1, 16, 6) and np.all(action["action.arm"] == i)
            assert info["server_timing"]["merged_requests"] == 3
        assert [rows for _, _, rows in inner.log] == [3]
        for c in clients:
            c.close()
    finally:
        server.stop(10)


def test_one_bad_request_in_a_merged_call_fails_alone():
    policy = SlowPolicy(delay=0.05)
    good = ActionRequest(marked_observation(1), None, "a")
    bad = ActionRequest(franka_observation(state_dim_override={"eef_pos": 5}), None, "b")
    outcomes = policy.serve_batch([good, bad, ActionRequest(marked_observation(3), None, "c")])
    assert np.all(outcomes[0][0]["arm"] == 1) and np.all(outcomes[2][0]["arm"] == 3)
    assert "expected dimension D=3, got D=5" in str(outcomes[1])


def test_scripted_expert_is_batched_and_keeps_each_clients_envs_apart():
    pytest.importorskip("robosuite")
    from policyserve.sim.scripted import make_scripted_policy

    policy = make_scripted_policy("lift")
    assert policy.batchable
    keys = policy.get_modality_config()["state"].modality_keys
    dims = policy.get_modality_dims().state

    def obs(cube_z: float) -> dict:
        state = {k: np.zeros((1, 1, dims[k]), np.float32) for k in keys}
        state["eef_quat"][..., 3] = 1
        state["cube_pos"][..., 2] = cube_z
        state["eef_pos"][..., 2] = cube_z + 0.2
        return {"video": {}, "state": state, "language": {"annotation.human.action.task_description": [["lift"]]}}

    alone = [make_scripted_policy("lift").get_action(obs(z)) for z in (0.8, 0.9)]
    merged = policy.serve_batch([ActionRequest(obs(0.8), None, "a"), ActionRequest(obs(0.9), None, "b")])
    for (action, _), (expected, _) in zip(merged, alone):
        np.testing.assert_array_equal(action["arm"], expected["arm"])
    assert {k[0] for k in policy.experts} == {"a", "b"}
    policy.serve_reset({"env_ids": [0]}, "a")  # one client's reset leaves the other's expert alone
    assert set(policy.experts) == {("b", 0)}


# -- bounded queues and fairness ------------------------------------------------------------------------------
def test_flooding_client_gets_busy_errors_and_cannot_delay_another_clients_reset():
    class ResetArrival(SchedulerListener):
        received: float | None = None

        def answered(self, request, ok, policy_start, policy_end):
            if request.endpoint == "reset":
                self.received = request.received  # perf_counter when the door read it

    policy = SlowPolicy(delay=0.02)
    arrival = ResetArrival()
    server = PolicyServer(policy, port=0, verbose=False, listener=arrival, max_queued_per_client=8, max_batch_size=4)
    server.start()
    flood = Dealer(server.port)
    try:
        n = 300
        for i in range(n):
            flood.send("get_action", {"observation": marked_observation(i % 7), "options": None})
        wait_for(lambda: len(policy.log) >= 1, "the flood is being served")
        with PolicyClient(port=server.port, timeout_ms=5000) as other:
            assert other.ping()  # answered at once, whatever is queued
            assert other.get_modality_config()["state"].modality_keys == ["eef_pos", "eef_quat", "gripper_pos"]
            assert other.reset({"episode": 1}) == {"reset": True}
            action, info = other.get_action(marked_observation(42.0))
            assert np.all(action["arm"] == 42.0)
        with policy.lock:
            reset_at = next(t for what, t, _ in policy.log if what == "reset")
            # calls started between the reset's arrival at the door and its own call (not its time in transit,
            # which a loaded machine stretches)
            calls_before_reset = [t for what, t, _ in policy.log
                                  if what == "get_action" and arrival.received < t < reset_at]
        assert len(calls_before_reset) <= 1  # served after at most the call in progress
        replies = [flood.recv() for _ in range(n)]
        busy = [r for r in replies if isinstance(r, dict)]
        served = [r for r in replies if isinstance(r, list)]
        assert len(busy) + len(served) == n  # every request answered, none lost
        assert busy and all("server busy" in r["error"] and "max_queued_per_client=8" in r["error"] for r in busy)
        assert len(served) >= 8
    finally:
        flood.close()
        server.stop(10)


def test_total_queued_bytes_limit_refuses_at_once_and_names_the_limit():
    policy = GatedPolicy()
    obs = franka_observation(batch=4, size=64)
    size = len(packb({"endpoint": "get_action", "data": {"observation": obs, "options": None}}))
    server = start(policy, max_queued_bytes=int(size * 1.5), max_batch_size=1)
    dealers = [Dealer(server.port) for _ in range(4)]
    try:
        dealers[0].send("get_action", {"observation": obs, "options": None})
        wait_for(lambda: policy.entered == 1, "the first request is in a policy call")
        dealers[1].send("get_action", {"observation": obs, "options": None})
        wait_for(lambda: server.scheduler.queued == 1, "the second request is queued")
        for d in dealers[2:]:
            d.send("get_action", {"observation": obs, "options": None})
        busy = [d.recv() for d in dealers[2:]]  # refused at once, while the call still waits
        assert all("server busy" in r["error"] and "max_queued_bytes" in r["error"] for r in busy), busy
        policy.gate.set()
        assert all(isinstance(d.recv(), list) for d in dealers[:2])  # the one in progress and the one that fitted
        with PolicyClient(port=server.port, timeout_ms=5000) as c:
            assert c.get_action(obs)[0]["arm"].shape == (4, 16, 6)  # still serving
    finally:
        for d in dealers:
            d.close()
        server.stop(10)


def test_message_size_counts_every_frame_and_odd_envelopes_are_refused():
    server = start(ConstantPolicy(SPEC.modality_configs, SPEC.dims), max_message_bytes=100_000)
    dealer = Dealer(server.port)
    try:
        big = b"x" * 90_000  # each frame under the limit, together over it
        dealer.sock.send_multipart([big] * 5)  # extra frames must not ride along as an "envelope"
        reply_frames = dealer.sock.recv_multipart() if dealer.sock.poll(5000) else None
        assert reply_frames is not None and sum(len(f) for f in reply_frames) < 1000
        assert "malformed request" in unpackb(reply_frames[-1])["error"]
        dealer.sock.send_multipart([b"", packb({"endpoint": "ping", "data": {"pad": "y" * 120_000}})])
        assert "exceeds the server's max_message_bytes=100000" in dealer.recv()["error"]
        dealer.send("ping", frames=[b"junk"])
        assert "malformed request" in dealer.recv()["error"]
        dealer.send("ping")  # DEALER without delimiter: served
        assert dealer.recv() == {"status": "ok", "message": "Server is running"}
        with PolicyClient(port=server.port) as c:  # REQ with delimiter: served
            assert c.ping()
    finally:
        dealer.close()
        server.stop(10)


# -- clean shutdown ------------------------------------------------------------------------------------------
def test_stop_answers_the_call_in_progress_and_everything_queued(capfd):
    policy = GatedPolicy()
    server = PolicyServer(policy, port=0, verbose=True)
    server.start()
    dealers = [Dealer(server.port) for _ in range(3)]
    try:
        dealers[0].send("get_action", {"observation": marked_observation(5), "options": None})
        wait_for(lambda: policy.entered == 1, "client 0's call is in progress")
        dealers[1].send("get_action", {"observation": marked_observation(6), "options": {"x": 1}})
        dealers[2].send("reset", {"options": None})
        wait_for(lambda: server.scheduler.queued == 2, "the other two requests are queued")
        stopped = []
        stopper = threading.Thread(target=lambda: stopped.append(server.stop(10)))
        stopper.start()
        wait_for(lambda: server.scheduler._closed, "the scheduler has closed")  # the queued ones are answered
        policy.gate.set()  # now the call in progress finishes
        stopper.join(20)
        assert stopped == [True] and server.closed
        assert not server._thread.is_alive()
        first = dealers[0].recv(2000)
        assert isinstance(first, list) and np.all(first[0]["arm"] == 5)
        assert dealers[1].recv(2000) == {"error": "server shutting down"}
        assert dealers[2].recv(2000) == {"error": "server shutting down"}
        out = capfd.readouterr()
        assert "Traceback" not in out.out + out.err and "Server stopped." in out.out
    finally:
        for d in dealers:
            d.close()


def test_kill_endpoint_shuts_down_cleanly_and_frees_the_port():
    server = start(ConstantPolicy(SPEC.modality_configs, SPEC.dims))
    port = server.port
    with PolicyClient(port=port, timeout_ms=3000) as c:
        c.kill_server()
    server._thread.join(10)
    assert server.closed
    again = PolicyServer(ConstantPolicy(SPEC.modality_configs, SPEC.dims), port=port, verbose=False)
    deadline = time.monotonic() + 5
    while True:  # libzmq releases the port asynchronously
        try:
            again.start()
            break
        except AddressInUseError:
            assert time.monotonic() < deadline
            again = PolicyServer(ConstantPolicy(SPEC.modality_configs, SPEC.dims), port=port, verbose=False)
            time.sleep(0.05)
    assert again.stop(10)


def test_failed_bind_closes_everything_and_the_process_exits():
    code = (
        "from policyserve import PolicyServer, ConstantPolicy\n"
        "from policyserve.registry import get_embodiment_spec\n"
        "s = get_embodiment_spec('franka_panda')\n"
        "a = PolicyServer(ConstantPolicy(s.modality_configs, s.dims), port=0, verbose=False); a.start()\n"
        "b = PolicyServer(ConstantPolicy(s.modality_configs, s.dims), port=a.port, verbose=False)\n"
        "try:\n    b.bind()\nexcept Exception as e:\n    print(type(e).__name__, e, b.closed)\n"
        "a.stop(10)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "AddressInUseError port" in done.stdout and "is in use True" in done.stdout


def test_serve_on_a_busy_port_prints_one_clear_line_and_fails():
    with serve_process() as (_, port):
        done = subprocess.run([sys.executable, "-m", "policyserve", "serve", "--port", str(port)],
                              capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert done.stderr.strip() == f"error: port {port} on 127.0.0.1 is in use"
    assert "Traceback" not in done.stdout + done.stderr


def test_serve_process_answers_queued_requests_on_sigterm():
    with serve_process("--max-batch-size", "1") as (proc, port):
        dealer = Dealer(port)
        try:
            for i in range(50):
                dealer.send("get_action", {"observation": franka_observation(batch=8, size=96), "options": None})
            dealer.send("ping")  # answered when read, so after its reply all 50 requests have been read too
            replies = []
            while (reply := dealer.recv(10000)) != {"status": "ok", "message": "Server is running"}:
                replies.append(reply)
            proc.terminate()
            replies += [dealer.recv(10000) for _ in range(50 - len(replies))]
        finally:
            dealer.close()
        assert proc.wait(20) == 0
        output = proc.stdout.read()
    assert all(isinstance(r, list) or r == {"error": "server shutting down"} for r in replies)
    assert "Traceback" not in output and "Server stopped." in output


def test_requests_still_unread_at_shutdown_are_answered():
    policy = GatedPolicy()
    server = start(policy, max_batch_size=1)
    dealer = Dealer(server.port)
    try:
        dealer.send("get_action", {"observation": marked_observation(1), "options": None})
        wait_for(lambda: policy.entered == 1, "the call is in progress")
        stopper = threading.Thread(target=server.stop, args=(10,))
        stopper.start()  # stops reading at once, then waits for the call in progress
        wait_for(lambda: server.gr00t._stopped_reading.is_set(), "the door stopped reading")
        for i in range(5):  # these arrive while the server no longer reads
            dealer.send("get_action", {"observation": marked_observation(i), "options": None})
        # they are in the server's ZeroMQ queue once no byte is left in either end of the connection
        wait_for(lambda: loopback_queues_empty(server.port), "the 5 requests have reached the server")
        policy.gate.set()
        stopper.join(20)
        assert server.closed
        replies = [dealer.recv(3000) for _ in range(6)]
        assert isinstance(replies[0], list)
        assert replies[1:] == [{"error": "server shutting down"}] * 5
    finally:
        dealer.close()


# -- decoded arrays --------------------------------------------------------------------------------------------
def test_policies_get_writable_arrays_merged_or_not():
    class NormalisesInPlace(SlowPolicy):
        def _get_action(self, observation, options=None):
            observation["state"]["eef_pos"] -= 1.0  # as GR00T-served policies may do
            observation["video"]["ego_view"][...] = 0
            return super()._get_action(observation, options)

    policy = NormalisesInPlace(delay=0.05)
    server = start(policy, batch_window_ms=200)
    try:
        with PolicyClient(port=server.port) as alone:
            action, info = alone.get_action(marked_observation(3))
            assert np.all(action["arm"] == 2) and info["server_timing"]["merged_requests"] == 1
        clients = [PolicyClient(port=server.port) for _ in range(2)]
        replies = concurrently([lambda i=i: clients[i].get_action(marked_observation(10 + i)) for i in range(2)])
        assert [float(r[0]["arm"][0, 0, 0]) for r in replies] == [9.0, 10.0]
        assert replies[0][1]["server_timing"]["merged_requests"] == 2
        for c in clients:
            c.close()
    finally:
        server.stop(10)


def test_server_error_in_policy_is_answered_and_server_keeps_serving():
    class Fails(SlowPolicy):
        def _get_action(self, observation, options=None):
            if (options or {}).get("fail"):
                raise RuntimeError("boom")
            return super()._get_action(observation, options)

    server = start(Fails(delay=0.0))
    try:
        with PolicyClient(port=server.port) as c:
            with pytest.raises(ServerError, match="RuntimeError: boom"):
                c._get_action(marked_observation(1), {"fail": True})
            assert np.all(c.get_action(marked_observation(4))[0]["arm"] == 4)
    finally:
        server.stop(10)


def test_closed_loop_clients_stay_merged_without_waiting_out_the_rejoin_cap():
    # rejoin cap here: min(1000 ms, half of a 100 ms call) = 50 ms; both clients send again within a few ms.
    # The window (ended as soon as both are queued: max_batch_size=2) only lines up their first requests.
    policy = SlowPolicy(delay=0.1)
    server = start(policy, rejoin_wait_ms=1000, batch_window_ms=500, max_batch_size=2)
    try:
        clients = [PolicyClient(port=server.port) for _ in range(2)]
        go = threading.Barrier(2, timeout=10)

        def loop(i):
            go.wait()
            return [clients[i].get_action(marked_observation(i))[1]["server_timing"] for _ in range(4)]

        timings = concurrently([lambda i=i: loop(i) for i in range(2)])
        later = [t for per_client in timings for t in per_client[1:]]
        assert all(t["merged_requests"] == 2 for t in later)
        assert max(t["queue_ms"] for t in later) < 40  # nobody waited out the 50 ms cap
        for c in clients:
            c.close()
    finally:
        server.stop(10)
