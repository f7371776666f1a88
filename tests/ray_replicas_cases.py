"""Policy replicas on a real two-node Ray cluster on loopback (``ray.cluster_utils.Cluster``).

One GR00T-wire front door (a real ZeroMQ server) hands merged batches to Ray Serve replicas that build
their own policy; replicas are killed, nodes removed, and every request must still be answered. The
replicas import the test policy from ``helpers`` (the cluster's nodes get ``tests/`` on PYTHONPATH).
Run by tests/test_ray.py in a process of its own (Serve leaves per-process handles and threads behind).
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import ray
from ray import serve
from ray.cluster_utils import Cluster

from policyserve import PolicyClient, PolicyServer, ServerError
from policyserve.data.lerobot import LeRobotDataset
from policyserve.serving.spec import PolicySpec
from policyserve.serving.ray_backend import RayBackend, RayConfig

from helpers import (LONG_CALL_MARK, LongCallPolicy, SlowPolicy, concurrently, descendants, franka_observation,
                     marked_observation)

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]  # bounded, with room for a machine under load

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
NODE_MEMORY = 80 * 1024 * 1024


@pytest.fixture(scope="module")
def cluster():
    """Head and one worker node, two CPUs each; Serve spreads replicas over the nodes."""
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), str(TESTS), saved) if p)
    try:
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 2, "object_store_memory": NODE_MEMORY, "include_dashboard": False})
        cluster.add_node(num_cpus=2, object_store_memory=NODE_MEMORY)
    finally:
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved
    cluster.wait_for_nodes(60)
    yield cluster
    ray.shutdown()  # unconditionally: a shutdown cut short under load leaves the driver's node set
    cluster.shutdown()


@pytest.fixture(scope="module")
def marker_dir(tmp_path_factory):
    """Where :class:`LongCallPolicy` replicas say which of them is making a long call."""
    return tmp_path_factory.mktemp("long-calls")


@pytest.fixture(scope="module")
def slow_server(cluster, marker_dir):
    """A front door over two replicas of a 0.2 s echoing policy, on the cluster's two nodes."""
    backend = RayBackend(functools.partial(LongCallPolicy, delay=0.2, marker_dir=str(marker_dir)),
                         RayConfig(replicas=2, ray_address=cluster.address, no_replica_timeout_s=20,
                                   start_timeout_s=60))
    server = PolicyServer(backend=backend, port=0)
    server.start()
    yield server, backend
    assert server.stop(60)


def client_loop(port: int, value: float, n: int, echo: bool = True) -> list:
    """``n`` closed-loop get_action calls, each reply's echoed value checked (``echo``); infos (or errors)."""
    out = []
    with PolicyClient(port=port, timeout_ms=60000) as client:
        for _ in range(n):
            try:
                action, info = client.get_action(marked_observation(value))
            except ServerError as exc:
                out.append(exc)
                continue
            assert action["arm"].shape == (1, 16, 6)
            assert not echo or np.all(action["arm"] == value), "a merged reply was split into the wrong client's rows"
            out.append(info)
    return out


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


# -- replicas on two nodes -----------------------------------------------------------------------------------
def test_two_replicas_on_two_nodes_answer_merged_batches(slow_server):
    server, backend = slow_server
    assert backend.concurrency == 2 and server.scheduler.config.workers == 2
    assert backend.batchable and backend.replica_states() == {"RUNNING": 2}

    infos = [i for r in concurrently([functools.partial(client_loop, server.port, v, 6) for v in range(1, 7)],
                                     timeout=120) for i in r]
    assert len(infos) == 36 and all(isinstance(i, dict) for i in infos)
    replicas = {i["server_timing"]["replica"] for i in infos}
    nodes = {i["server_timing"]["replica_node"] for i in infos}
    assert len(replicas) == 2 and all(r.startswith(f"SERVE_REPLICA::{backend.app_name}#") for r in replicas)
    assert len(nodes) == 2, "the two replicas should run on the cluster's two nodes"
    assert max(i["server_timing"]["merged_requests"] for i in infos) > 1  # replicas get merged batches

    # a bad request fails alone, with the policy's own message, and the front door keeps serving
    bad = franka_observation()
    del bad["state"]["eef_pos"]
    with PolicyClient(port=server.port, timeout_ms=30000) as client:
        with pytest.raises(ServerError, match="eef_pos"):
            client.get_action(bad)
        assert client.reset() == {"reset": True}
        assert client.get_modality_config()["action"].modality_keys == ["arm", "gripper"]
        assert client.get_action(marked_observation(7.0))[0]["arm"].max() == 7.0


def test_killing_a_replica_mid_load_leaves_every_request_answered(slow_server, marker_dir, capfd):
    server, backend = slow_server
    wait_for(lambda: backend.replica_states() == {"RUNNING": 2}, 60, "two running replicas")
    results: list = []
    seen: list[str] = []
    long_call: list = []

    def load(value: float) -> None:
        with PolicyClient(port=server.port, timeout_ms=60000) as client:
            for _ in range(12):
                try:
                    action, info = client.get_action(marked_observation(value))
                    assert np.all(action["arm"] == value)
                    seen.append(info["server_timing"]["replica"])
                    results.append(info)
                except ServerError as exc:
                    results.append(exc)

    def long() -> None:  # a call that is still running on its replica when that replica is killed
        with PolicyClient(port=server.port, timeout_ms=120000) as client:
            try:
                long_call.append(client.get_action(marked_observation(LONG_CALL_MARK))[0]["arm"])
            except ServerError as exc:
                long_call.append(exc)

    threads = [threading.Thread(target=load, args=(float(v),)) for v in range(1, 5)]
    for t in threads:
        t.start()
    wait_for(lambda: len(seen) >= 4, 60, "the first replies")
    threads.append(threading.Thread(target=long))
    threads[-1].start()
    markers = lambda: [p for p in marker_dir.iterdir() if p.suffix != ".tmp"]  # noqa: E731
    wait_for(lambda: bool(markers()), 60, "the long call to start on a replica")
    victim = markers()[0].read_text()
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)

    assert len(results) == 48  # every request answered...
    assert len(long_call) == 1 and not isinstance(long_call[0], Exception), long_call
    assert np.all(long_call[0] == LONG_CALL_MARK)
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, f"in-flight calls of the killed replica should be retried on the other one: {errors}"
    assert "Policy replica died during get_action" in capfd.readouterr().out  # ...by the retry
    # the front door keeps serving; Serve replaces the killed replica
    assert client_loop(server.port, 3.0, 2)[-1]["server_timing"]["replica"] != victim
    wait_for(lambda: backend.replica_states() == {"RUNNING": 2}, 90, "Serve to restart the replica")


def test_no_replica_left_gives_a_clear_error_quickly_and_the_front_door_keeps_serving(cluster):
    """The only node able to host the replica (3 CPUs) dies: calls get a clear error, not a hang."""
    big_node = cluster.add_node(num_cpus=3, object_store_memory=NODE_MEMORY)
    cluster.wait_for_nodes(60)
    backend = RayBackend(PolicySpec().build, RayConfig(replicas=1, ray_address=cluster.address, replica_cpus=3,
                                                       no_replica_timeout_s=3, start_timeout_s=60,
                                                       graceful_shutdown_s=1))
    server = PolicyServer(backend=backend, port=0, verbose=False)
    server.start()
    try:
        with PolicyClient(port=server.port, timeout_ms=60000) as client:
            action, _ = client.get_action(franka_observation())
            assert action["arm"].shape == (1, 16, 6)
            cluster.remove_node(big_node)
            wait_for(lambda: not backend.replica_states().get("RUNNING"), 60, "the replica to be gone")
            start = time.monotonic()
            with pytest.raises(ServerError, match="no policy replica available: none of the 1 replicas has been "
                                                  "running for 3 s"):
                client.get_action(franka_observation())
            assert time.monotonic() - start < 20
            assert client.ping()  # the front door itself keeps serving
            assert client.get_modality_config()["action"].modality_keys == ["arm", "gripper"]
            cluster.add_node(num_cpus=3, object_store_memory=NODE_MEMORY)  # room again: Serve restarts it
            wait_for(lambda: backend.replica_states().get("RUNNING") == 1, 60, "the replica to come back")
            assert client.get_action(franka_observation())[0]["arm"].shape == (1, 16, 6)
    finally:
        assert server.stop(60)
    connected = ray.is_initialized()  # (through the module's other server, when it runs)
    if not connected:
        ray.init(address=cluster.address)
    try:  # the cluster outlives the server; only this server's application is gone
        assert backend.app_name not in serve.status().applications
    finally:
        if not connected:
            ray.shutdown()


def test_stateful_replay_policy_runs_as_one_replica_and_keeps_its_cursor(cluster, gr1_dataset_path):
    spec = PolicySpec(dataset_path=str(gr1_dataset_path), execution_horizon=8)
    assert spec.stateful
    backend = RayBackend(spec.build, RayConfig(replicas=2, ray_address=cluster.address, start_timeout_s=60),
                         stateful=True)
    server = PolicyServer(backend=backend, port=0, verbose=False)
    server.start()
    try:
        assert backend.concurrency == 1 and backend.replica_states() == {"RUNNING": 1}
        assert any("runs as one replica, not 2" in line for line in backend.describe())
        raw = LeRobotDataset(gr1_dataset_path).read_columns(2, ["action"])["action"].astype(np.float32)
        with PolicyClient(port=server.port, timeout_ms=30000) as client:
            keys = client.get_modality_config()["action"].modality_keys
            assert client.reset({"episode_index": 2, "step_index": 8})["current_step"] == 8
            for step in (8, 16):
                action, info = client.get_action(None, {"batch_size": 1})
                assert info["current_step"] == step
                np.testing.assert_array_equal(np.concatenate([action[k] for k in keys], axis=2)[0],
                                              raw[step:step + 16])
    finally:
        assert server.stop(60)


def test_autoscale_starts_at_min_and_scales_up_under_load(cluster):
    backend = RayBackend(functools.partial(SlowPolicy, delay=0.3),
                         RayConfig(replicas=1, autoscale=(1, 2), ray_address=cluster.address, start_timeout_s=60))
    server = PolicyServer(backend=backend, port=0, verbose=False)
    server.start()
    stop = threading.Event()

    def load(value: float) -> None:
        with PolicyClient(port=server.port, timeout_ms=60000) as client:
            while not stop.is_set():
                client.get_action(marked_observation(value), {"tag": value})  # unequal options: not merged

    threads = [threading.Thread(target=load, args=(float(v),), daemon=True) for v in range(4)]
    try:
        assert backend.concurrency == 2 and backend.replica_states() == {"RUNNING": 1}
        for t in threads:
            t.start()
        wait_for(lambda: backend.replica_states().get("RUNNING") == 2, 90, "Serve to add a second replica")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        assert server.stop(60)


# -- the command line ----------------------------------------------------------------------------------------
def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C"])
def test_cli_replicas_on_a_local_ray_instance_answer_and_shut_down_completely(how):
    proc = subprocess.Popen([sys.executable, "-m", "policyserve", "serve", "--port", "0", "--replicas", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(SRC)})
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any("listening on" in line for line in lines):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        banner = "".join(lines)
        assert "Replicas: 2 on local Ray instance" in banner, banner
        port = int(banner.rsplit(":", 1)[1])
        infos = concurrently([functools.partial(client_loop, port, v, 5, False) for v in (1, 2, 3, 4)], 120)
        assert {i["server_timing"]["replica"] for r in infos for i in r} and all(
            isinstance(i, dict) for r in infos for i in r)
        ray_processes = descendants(proc.pid)
        assert len(ray_processes) >= 4  # GCS, raylet, the two replicas, ...
        if how == "SIGTERM":
            proc.terminate()
        else:
            os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends the whole foreground group
        assert proc.wait(60) == 0
        output = proc.stdout.read()
        assert "Server stopped." in output and "Traceback" not in output
        wait_for(lambda: not any(alive(p) for p in ray_processes), 30, "the local Ray instance to exit")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_without_replicas_the_server_never_imports_ray():
    script = (
        "import os, signal, sys, threading\n"
        "from policyserve.cli.main import main\n"
        "def check():\n"
        "    print('RAY_IMPORTED' if 'ray' in sys.modules else 'NO_RAY', flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "threading.Timer(3, check).start()\n"
        "sys.exit(main(['serve', '--port', '0']))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "Server is ready" in out.stdout, out.stdout + out.stderr
    assert "NO_RAY" in out.stdout


@pytest.mark.parametrize("flags, message", [
    (["--ray-address", "127.0.0.1:6379"], "--ray-address needs --replicas N"),
    (["--replica-gpus", "1"], "--replica-gpus needs --replicas N"),
    (["--replicas", "2", "--autoscale", "3"], "--autoscale expects MIN:MAX"),
    (["--replicas", "0"], "--replicas must be >= 1, got 0"),
    (["--replicas", "5", "--autoscale", "1:4"], "--replicas 5 is outside the autoscale range 1:4"),
    (["--replicas", "1", "--replica-gpus", "64"], "each replica needs 64 GPUs (--replica-gpus) but the local Ray "
                                                  "instance has 0"),
])
def test_bad_replica_flags_fail_with_one_clear_line(flags, message):
    out = subprocess.run([sys.executable, "-m", "policyserve", "serve", "--port", "0", *flags],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: ") and message in out.stderr


def test_replicas_that_cannot_load_the_checkpoint_end_serve_with_one_clear_line():
    out = subprocess.run([sys.executable, "-m", "policyserve", "serve", "--port", "0", "--replicas", "1",
                          "--model-path", "/nonexistent/ckpt"], capture_output=True, text=True, timeout=180,
                         env={**os.environ, "PYTHONPATH": str(SRC)})
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "policy replicas failed to start" in errors[0]
    assert errors[0].endswith("model path /nonexistent/ckpt does not exist")
