"""Prometheus metrics (``serve --metrics-port``): scraped over HTTP during load from GR00T and openpi
clients and parsed with ``prometheus_client``'s own parser; without the flag nothing is started."""

from __future__ import annotations

import os
import re
import threading
import time
import urllib.request

import pytest
import websockets
from openpi_client.websocket_client_policy import WebsocketClientPolicy
from prometheus_client.parser import text_string_to_metric_families

from policyserve import PolicyClient, PolicyServer, ServerError, UnauthorizedError
from policyserve.wire.gr00t import packb
from policyserve.serving.doors.openpi import OpenpiFrontDoor
from policyserve.serving.doors.metrics import METRICS, MetricsExporter

from helpers import franka_observation
from serve_process import serve_process
from test_openpi import franka_openpi_obs
from test_serving import Dealer, SlowPolicy

pytestmark = pytest.mark.timeout(120)


def start(policy, **kwargs) -> tuple[PolicyServer, int, int]:
    """Server with the GR00T socket, the openpi door and metrics; returns (server, openpi port, metrics port)."""
    server = PolicyServer(policy, port=0, verbose=False, **kwargs)
    openpi, metrics = OpenpiFrontDoor(port=0), MetricsExporter(port=0)
    server.add_front_door(openpi)
    server.add_front_door(metrics)
    server.start()
    return server, openpi.port, metrics.port  # type: ignore[return-value]


def wait_for(condition, what: str, timeout: float = 30.0) -> None:
    """Wait (bounded) until ``condition()`` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


def scrape(port: int) -> list:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return [s for family in text_string_to_metric_families(response.read().decode()) for s in family.samples]


def value(samples: list, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels`` (0 when there are none)."""
    return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())


def test_scrape_during_load_counts_requests_latencies_and_batches():
    policy = SlowPolicy(delay=0.01)
    server, openpi_port, metrics_port = start(policy)
    n_gr00t, n_openpi, rounds = 3, 2, 12
    try:
        errors: list = []

        def gr00t_load():
            try:
                with PolicyClient(port=server.port, timeout_ms=10000) as c:
                    for _ in range(rounds):
                        c.get_action(franka_observation(batch=1))
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        def openpi_load():
            try:
                client = WebsocketClientPolicy("127.0.0.1", openpi_port)
                for _ in range(rounds):
                    client.infer(franka_openpi_obs())
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=gr00t_load) for _ in range(n_gr00t)]
        threads += [threading.Thread(target=openpi_load) for _ in range(n_openpi)]
        for t in threads:
            t.start()
        during = []
        deadline = time.monotonic() + 60
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
            during.append(value(scrape(metrics_port), "policyserve_requests_total"))
            time.sleep(0.02)
        for t in threads:
            t.join(30)
        assert not errors and not any(t.is_alive() for t in threads)
        assert len(during) >= 2 and during == sorted(during) and during[-1] > 0  # counters move during load

        final = scrape(metrics_port)
        total = (n_gr00t + n_openpi) * rounds
        for protocol, n in (("gr00t", n_gr00t * rounds), ("openpi", n_openpi * rounds)):
            labels = {"endpoint": "get_action", "protocol": protocol}
            assert value(final, "policyserve_requests_total", **labels, outcome="ok") == n
            for histogram in ("queue", "policy", "request"):
                assert value(final, f"policyserve_{histogram}_seconds_count", **labels) == n
                assert value(final, f"policyserve_{histogram}_seconds_bucket", **labels, le="+Inf") == n
            assert 0 < value(final, "policyserve_request_seconds_sum", **labels) < n * 5
        calls = [rows for what, _, rows in policy.log if what == "get_action"]
        assert value(final, "policyserve_batch_size_count", endpoint="get_action") == len(calls)
        assert value(final, "policyserve_batch_size_sum", endpoint="get_action") == total == sum(calls)
        assert len(calls) < total  # some requests were merged
        assert value(final, "policyserve_batch_size_bucket", endpoint="get_action", le="1.0") < len(calls)
        assert value(final, "policyserve_queue_depth") == 0
        assert value(final, "policyserve_replicas") == 1
        assert value(final, "policyserve_requests_total", outcome="error") == 0
        documented = {s.name for s in final} - {n for n in (s.name for s in final) if n.endswith("_created")}
        assert {re.sub(r"_(bucket|count|sum)$", "", n) for n in documented} == set(METRICS)
    finally:
        server.stop(10)


class GatedPolicy(SlowPolicy):
    """A policy whose calls wait while ``gate`` is clear; ``entered`` counts the calls that started."""

    def __init__(self) -> None:
        super().__init__(delay=0.0)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = 0

    def _get_action(self, observation, options=None):
        with self.lock:
            self.entered += 1
        assert self.gate.wait(30), "gate never opened"
        return super()._get_action(observation, options)


def test_busy_rejections_auth_failures_invalid_and_failed_requests_are_counted():
    policy = GatedPolicy()
    server, openpi_port, metrics_port = start(policy, api_token="tok", max_queued_per_client=1)
    dealer = Dealer(server.port)
    try:
        with PolicyClient(port=server.port, timeout_ms=5000, api_token="wrong") as intruder:
            with pytest.raises(UnauthorizedError):
                intruder.call_endpoint("ping", requires_input=False)
        with pytest.raises(websockets.InvalidStatus, match="401"):
            WebsocketClientPolicy("127.0.0.1", openpi_port)
        client = WebsocketClientPolicy("127.0.0.1", openpi_port, api_key="tok")
        with pytest.raises(RuntimeError, match="observation/image"):
            client.infer({"prompt": "no state"})
        with PolicyClient(port=server.port, timeout_ms=5000, api_token="tok") as c:
            with pytest.raises(ServerError, match="Unknown endpoint"):
                c.call_endpoint("no_such_endpoint", requires_input=False)
            with pytest.raises(ServerError, match="eef_pos"):
                c.get_action(franka_observation(batch=1, state_dim_override={"eef_pos": 5}))

        body = packb({"endpoint": "get_action", "data": {"observation": franka_observation(batch=1)},
                      "api_token": "tok"})
        policy.gate.clear()  # the policy call now waits for the gate: no race with the worker
        entered = policy.entered
        dealer.sock.send_multipart([body])  # one runs: wait until the policy has it
        wait_for(lambda: policy.entered > entered, "the first request reaches the policy")
        dealer.sock.send_multipart([body])  # one queues
        wait_for(lambda: server.scheduler.queued == 1, "the second request is queued")
        for _ in range(2):  # two are refused at once
            dealer.sock.send_multipart([body])
        busy = [dealer.recv() for _ in range(2)]
        assert all("server busy" in r.get("error", "") for r in busy), busy
        policy.gate.set()
        replies = [dealer.recv() for _ in range(2)]
        assert all(isinstance(r, list) for r in replies), replies

        samples = scrape(metrics_port)
        assert value(samples, "policyserve_auth_failures_total", protocol="gr00t") == 1
        assert value(samples, "policyserve_auth_failures_total", protocol="openpi") == 1
        assert value(samples, "policyserve_busy_rejections_total", limit="max_queued_per_client",
                     protocol="gr00t") == 2
        assert value(samples, "policyserve_requests_total", endpoint="get_action", protocol="gr00t",
                     outcome="busy") == 2
        assert value(samples, "policyserve_requests_total", endpoint="get_action", protocol="openpi",
                     outcome="invalid") == 1
        assert value(samples, "policyserve_requests_total", endpoint="unknown", protocol="gr00t",
                     outcome="invalid") == 1
        assert value(samples, "policyserve_requests_total", endpoint="get_action", protocol="gr00t",
                     outcome="error") == 1
        assert value(samples, "policyserve_requests_total", endpoint="get_action", protocol="gr00t",
                     outcome="ok") == 2
        assert client.infer(franka_openpi_obs())["actions"].shape == (16, 7)  # still serving
    finally:
        dealer.close()
        server.stop(10)


def _listening_ports(pid: int) -> set[int]:
    """TCP ports process ``pid`` listens on (from /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.read().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_no_metrics_port_starts_no_metrics_server_and_imports_nothing_of_it():
    importtime = {"PYTHONPROFILEIMPORTTIME": "1"}  # the banner then lists every module imported before ready
    with serve_process(env=importtime) as (proc, port):
        assert "prometheus_client" not in proc.banner and "policyserve.serving.doors.metrics" not in proc.banner
        assert "websockets" not in proc.banner
        assert _listening_ports(proc.pid) == {port}
    with serve_process("--metrics-port", "0", "--openpi-port", "0", env=importtime) as (proc, port):
        assert "prometheus_client" in proc.banner and "websockets" in proc.banner
        metrics_port = int(re.search(r"Metrics: http://127\.0\.0\.1:(\d+)/metrics", proc.banner).group(1))
        openpi_port = int(re.search(r"openpi clients: listening on ws://127\.0\.0\.1:(\d+)", proc.banner).group(1))
        assert _listening_ports(proc.pid) == {port, metrics_port, openpi_port}
        assert value(scrape(metrics_port), "policyserve_replicas") == 1


def test_a_taken_metrics_port_ends_serve_with_one_line():
    import socket
    import subprocess
    import sys

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "policyserve", "serve", "--port", "0", "--metrics-port",
                              str(port)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.strip() == f"error: port {port} on 127.0.0.1 is in use"
