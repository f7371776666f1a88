"""Bounded connections (issue 17 items 2 and 6): every connection set of a door has a bound, and each test
hits it with real sockets on loopback, checks the clear error, and checks that a well-behaved client is
still served. Every wait is bounded and waits for the state it asserts on.
"""

from __future__ import annotations

import gc
import os
import re
import resource
import select
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import ExitStack, contextmanager

import pytest
import websockets
import websockets.sync.client
from openpi_client import msgpack_numpy
from openpi_client.websocket_client_policy import WebsocketClientPolicy

from policyserve import ConfigError, ConstantPolicy, PolicyClient, PolicyServer
from policyserve.registry import get_embodiment_spec
from policyserve.serving.doors.metrics import MAX_CONNECTIONS as METRICS_MAX_CONNECTIONS
from policyserve.serving.doors.metrics import MetricsExporter
from policyserve.serving.doors.openpi import OpenpiFrontDoor
from policyserve.types import ModalityDims

from helpers import franka_observation
from test_openpi import franka_openpi_obs

pytestmark = pytest.mark.timeout(180)
SPEC = get_embodiment_spec("franka_panda")


def constant() -> ConstantPolicy:
    return ConstantPolicy(SPEC.modality_configs, SPEC.dims)


def big_reply_policy(arm_dim: int = 120_000) -> ConstantPolicy:
    """Replies of 16 x (arm_dim + 1) floats (several MB): more than loopback's socket buffers take at once."""
    dims = ModalityDims(video=dict(SPEC.dims.video), state=dict(SPEC.dims.state),
                        action={**SPEC.dims.action, "arm": arm_dim})
    return ConstantPolicy(SPEC.modality_configs, dims)


def start(policy=None, gr00t: bool = False, metrics: bool = False, **config) -> tuple[PolicyServer, OpenpiFrontDoor]:
    server = PolicyServer(policy or constant(), port=0 if gr00t else None, verbose=False, **config)
    door = OpenpiFrontDoor(port=0)
    server.add_front_door(door)
    if metrics:
        server.add_front_door(MetricsExporter(port=0))
    server.start()
    return server, door


def metrics_port(server: PolicyServer) -> int:
    return next(d.port for d in server.front_doors if isinstance(d, MetricsExporter))


def wait_for(predicate, timeout: float = 10.0, what: str = "state") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed (or reset) ``sock``: it is readable and reads EOF/reset."""
    if not select.select([sock], [], [], 0)[0]:
        return False
    try:
        return sock.recv(65536, socket.MSG_PEEK) == b""
    except ConnectionError:
        return True


def idle_sockets(port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        socks.append(s)
    return socks


@contextmanager
def closing_all(socks):
    try:
        yield socks
    finally:
        for s in socks:
            s.close()


def served(port: int) -> None:
    """A well-behaved openpi client connects and gets an action."""
    client = WebsocketClientPolicy("127.0.0.1", port)
    try:
        assert client.infer(franka_openpi_obs())["actions"].shape[0] == 16
    finally:
        client._ws.close()


# -- openpi: admitted connections ---------------------------------------------------------------------
def test_openpi_refuses_connections_past_max_connections_with_503_and_serves_the_others():
    server, door = start(max_connections=2)
    try:
        first = WebsocketClientPolicy("127.0.0.1", door.port)
        second = WebsocketClientPolicy("127.0.0.1", door.port)
        with pytest.raises(websockets.InvalidStatus, match="503") as refused:
            WebsocketClientPolicy("127.0.0.1", door.port)
        assert b"max_connections" in refused.value.response.body and door.refused == 1
        assert first.infer(franka_openpi_obs())["actions"].shape == (16, 7)
        assert second.infer(franka_openpi_obs())["actions"].shape == (16, 7)
        first._ws.close()
        wait_for(lambda: len(door._connections) == 1, what="the server to see the closed connection")
        served(door.port)  # a freed slot takes a new client
    finally:
        server.stop(10)


def test_pending_handshakes_past_the_limit_drop_the_oldest_and_a_new_client_is_served():
    server, door = start(max_pending_connections=4)
    try:
        with closing_all(idle_sockets(door.port, 10)) as socks:
            wait_for(lambda: sum(closed_by_server(s) for s in socks[:6]) == 6, what="the 6 oldest to be dropped")
            assert not any(closed_by_server(s) for s in socks[6:]) and door._pending.dropped >= 6
            served(door.port)
    finally:
        server.stop(10)


def test_a_connection_that_never_finishes_its_handshake_is_dropped_after_open_timeout():
    server, door = start(open_timeout=0.5)
    try:
        with closing_all(idle_sockets(door.port, 1)) as (silent,):
            silent.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # half a request, never finished
            started = time.monotonic()
            wait_for(lambda: closed_by_server(silent), what="the silent connection to be dropped")
            assert time.monotonic() - started < 5.0
            served(door.port)
    finally:
        server.stop(10)


def test_an_idle_openpi_connection_is_closed_after_idle_timeout_naming_it():
    server, door = start(idle_timeout=2.0)
    try:
        idle = websockets.sync.client.connect(f"ws://127.0.0.1:{door.port}", compression=None, max_size=None)
        idle.recv(10)  # metadata
        active = WebsocketClientPolicy("127.0.0.1", door.port)
        started = time.monotonic()
        while time.monotonic() - started < 3.0:  # a client that keeps sending within the timeout stays connected
            assert active.infer(franka_openpi_obs())["actions"].shape == (16, 7)
            time.sleep(0.05)
        with pytest.raises(websockets.ConnectionClosedOK) as closed:
            idle.recv(10)
        assert "idle_timeout" in closed.value.rcvd.reason
    finally:
        server.stop(10)


# -- openpi: a client that does not read --------------------------------------------------------------
def non_reader(port: int) -> websockets.sync.client.ClientConnection:
    """A websocket client that stops reading after one frame (its small receive buffer fills, the server's
    writes block); ``recv()`` later takes what the server sent."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    return websockets.sync.client.connect(f"ws://127.0.0.1:{port}", sock=sock, compression=None, max_size=None,
                                          max_queue=1)


def test_a_client_that_never_reads_gets_server_busy_instead_of_the_server_buffering():
    server, door = start(big_reply_policy(), max_unsent_bytes=1_000_000)
    try:
        hog = non_reader(door.port)
        request = msgpack_numpy.packb(franka_openpi_obs())
        hog.send(request)
        wait_for(lambda: any(c.unsent_bytes > 1_000_000 for c in door._connections),
                 what="the server to hold more than max_unsent_bytes for the non-reader")
        hog.send(request)  # refused before any work: the client has not read what it has
        wait_for(lambda: any(c.in_flight == 2 and c.unsent_bytes > 1_000_000 for c in door._connections),
                 what="the second request to be answered")
        held = max(c.unsent_bytes for c in door._connections)
        assert held < 2 * 1_000_000 + 16 * 120_001 * 8  # one reply past the limit, not one per request
        served(door.port)  # others are served meanwhile
        assert isinstance(hog.recv(10), bytes)  # metadata
        assert msgpack_numpy.unpackb(hog.recv(30))["actions"].shape == (16, 120_001)
        busy = hog.recv(10)
        assert isinstance(busy, str) and busy.startswith("server busy") and "max_unsent_bytes=1000000" in busy
        hog.send(request)  # having read, it is served again
        assert msgpack_numpy.unpackb(hog.recv(30))["actions"].shape == (16, 120_001)
        hog.close()
    finally:
        server.stop(10)


def test_requests_are_queued_by_their_decoded_size():
    from policyserve.serving.events import SchedulerListener
    from policyserve.wire.gr00t import DecodeStats
    from policyserve.wire.openpi import unpackb

    seen: list[int] = []

    class Sizes(SchedulerListener):
        def answered(self, request, ok, policy_start, policy_end) -> None:
            seen.append(request.nbytes)

    server = PolicyServer(constant(), port=None, verbose=False, listener=Sizes())
    door = OpenpiFrontDoor(port=0)
    server.add_front_door(door)
    server.start()
    try:
        message = msgpack_numpy.packb(franka_openpi_obs())
        stats = DecodeStats()
        unpackb(message, stats=stats)
        assert stats.decoded_bytes > len(message)  # the decoder's estimate includes the objects' overhead
        client = WebsocketClientPolicy("127.0.0.1", door.port)
        assert client.infer(franka_openpi_obs())["actions"].shape == (16, 7)
        wait_for(lambda: seen, what="the answered event")
        assert seen == [stats.decoded_bytes]
    finally:
        server.stop(10)


# -- shutdown with hung clients -----------------------------------------------------------------------
def test_shutdown_within_a_second_with_two_hung_clients_and_no_traceback(capfd):
    server = PolicyServer(big_reply_policy(), port=0, verbose=True)
    door = OpenpiFrontDoor(port=0)
    server.add_front_door(door)
    server.start()
    hogs = []
    try:
        capfd.readouterr()
        reader_gone = non_reader(door.port)  # has a reply it never reads
        reader_gone.send(msgpack_numpy.packb(franka_openpi_obs()))
        never_closes = non_reader(door.port)  # will not answer the closing handshake (stopped reading)
        hogs = [reader_gone, never_closes]
        wait_for(lambda: any(c.unsent_bytes > 0 for c in door._connections), what="a reply stuck for the client")
        started = time.monotonic()
        assert server.stop(10)
        elapsed = time.monotonic() - started
        gc.collect()
        out, err = capfd.readouterr()
        assert elapsed < 1.0, elapsed
        assert "Traceback" not in out + err and "Task was destroyed" not in out + err, out + err
        assert "Server stopped." in out
    finally:
        for hog in hogs:
            hog.close_socket()
        server.stop(10)


# -- metrics ------------------------------------------------------------------------------------------
def scrape(port: int, token: str | None = None) -> str:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers)
    with urllib.request.urlopen(request, timeout=10) as reply:
        return reply.read().decode()


def test_metrics_token_is_required_when_set():
    server, _ = start(metrics=True, metrics_token="scrape-me")
    try:
        port = metrics_port(server)
        with pytest.raises(urllib.error.HTTPError) as refused:
            scrape(port)
        assert refused.value.code == 401 and "Bearer" in refused.value.headers["WWW-Authenticate"]
        with pytest.raises(urllib.error.HTTPError, match="401"):
            scrape(port, "wrong")
        assert "policyserve_requests_total" in scrape(port, "scrape-me")
    finally:
        server.stop(10)


def test_idle_metrics_connections_are_bounded_and_scrapes_still_answered():
    server, _ = start(metrics=True)
    try:
        port = metrics_port(server)
        n = METRICS_MAX_CONNECTIONS + 20
        with closing_all(idle_sockets(port, n)) as socks:
            wait_for(lambda: sum(closed_by_server(s) for s in socks[:20]) == 20, what="the oldest to be dropped")
            assert "policyserve_requests_total" in scrape(port)
    finally:
        server.stop(10)


def test_connection_limits_are_checked_by_name():
    for field, value in (("max_connections", 0), ("max_pending_connections", 0), ("max_unsent_bytes", 0)):
        with pytest.raises(ConfigError, match=f"{field} must be >= 1"):
            PolicyServer(constant(), port=None, **{field: value})
    with pytest.raises(ConfigError, match="open_timeout"):
        PolicyServer(constant(), port=None, open_timeout=0)
    with pytest.raises(ConfigError, match="tls_key needs tls_cert"):
        PolicyServer(constant(), port=None, tls_key="k.pem")


# -- 1000 idle connections on every port, a real `policyserve serve` --------------------------------------
def _raise_own_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))


def test_a_thousand_idle_connections_on_every_port_do_not_stop_new_clients(tmp_path):
    _raise_own_limit(4096)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        pytest.skip(f"this process may open only {soft} files")
    child_hard = min(hard, 8192)

    def low_soft_limit() -> None:  # the server starts with a soft limit of 256 and raises it itself
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, child_hard))

    log = tmp_path / "serve.log"
    with open(log, "wb") as out, ExitStack() as stack:
        proc = subprocess.Popen(
            [sys.executable, "-m", "policyserve", "serve", "--port", "0", "--openpi-port", "0", "--metrics-port",
             "0"], stdout=out, stderr=subprocess.STDOUT, preexec_fn=low_soft_limit, env=os.environ.copy())
        stack.callback(lambda: (proc.poll() is None and proc.kill(), proc.wait(10)))
        ready = re.compile(rb"Server is ready and listening on tcp://[\d.]+:(\d+)")
        wait_for(lambda: ready.search(log.read_bytes()) or proc.poll() is not None, 60, "the server banner")
        banner = log.read_bytes()
        assert proc.poll() is None, banner
        gr00t = int(ready.search(banner).group(1))
        openpi = int(re.search(rb"listening on ws://[\d.]+:(\d+)", banner).group(1))
        metrics = int(re.search(rb"Metrics: http://[\d.]+:(\d+)", banner).group(1))
        socks = idle_sockets(openpi, 400) + idle_sockets(gr00t, 400) + idle_sockets(metrics, 200)
        stack.callback(lambda: [s.close() for s in socks])
        served(openpi)
        with PolicyClient(port=gr00t, timeout_ms=20_000) as client:
            action, _ = client.get_action(franka_observation())
            assert action
        assert "policyserve_requests_total" in scrape(metrics)
        # the doors' bounds were hit: the oldest pending openpi and metrics sockets were dropped
        wait_for(lambda: sum(closed_by_server(s) for s in socks[:100]) == 100, what="old openpi sockets dropped")
        wait_for(lambda: sum(closed_by_server(s) for s in socks[800:850]) == 50, what="old metrics sockets dropped")
        assert proc.poll() is None
    size = log.stat().st_size
    assert size < 1 << 20, size
    assert b"Traceback" not in log.read_bytes()
