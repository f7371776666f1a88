"""Ray safety cases, run by tests/test_ray.py in a process of their own (Ray keeps per-process auth
state that earlier Ray tests in the same process change).

Ray, safely: the local instance listens on loopback only with token auth on, a cluster that refuses
this process's token is one clear error, and relative paths reach workers as absolute ones.

Real components only: a local Ray instance started by policyserve (with a Serve replica), and a real
``ray start --head`` with token authentication on 127.0.0.1, stopped by process id afterwards.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from policyserve.cluster import runtime
from policyserve.cluster.runtime import RayAuthError, absolute_paths, join_ray

from helpers import descendants

pytestmark = pytest.mark.ray

TESTS = Path(__file__).resolve().parent
LOOPBACK_ADDRESSES = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}
AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")


def _address(hex_address: str, v6: bool) -> tuple[str, int]:
    ip, port = hex_address.split(":")
    raw = bytes.fromhex(ip)
    if v6:  # four host-order 32-bit words
        return socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))), int(port, 16)
    return socket.inet_ntop(socket.AF_INET, raw[::-1]), int(port, 16)


def listening_sockets(pids: set[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket and bound UDP socket the processes hold (/proc)."""
    owner: dict[str, int] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                owner[target[8:-1]] = pid
    found = []
    for table in ("tcp", "tcp6", "udp", "udp6"):
        try:
            with open(f"/proc/net/{table}") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            listening = cols[3] == "0A" if table.startswith("tcp") else True
            if cols[9] in owner and listening:
                found.append((owner[cols[9]], *_address(cols[1], table.endswith("6"))))
    return found


def command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")[:120]
    except OSError:
        return "?"


@pytest.fixture
def clean_auth_env():
    """No Ray token settings and a HOME without ~/.ray/auth_token; restored (with Ray's cached view of them)
    afterwards."""
    saved = {key: os.environ.get(key) for key in (*AUTH_ENV, "HOME")}
    home = tempfile.mkdtemp(prefix="ps-home-")
    for key in AUTH_ENV:
        os.environ.pop(key, None)
    os.environ["HOME"] = home
    yield home
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    runtime._refresh_auth_config()
    shutil.rmtree(home, ignore_errors=True)


def test_local_instance_is_loopback_only_with_token_auth_and_no_http_proxy(clean_auth_env):
    import ray
    from ray import serve

    from policyserve.serving.ray_backend import RayBackend, RayConfig
    from policyserve.serving.spec import PolicySpec

    assert not ray.is_initialized()
    backend = RayBackend(PolicySpec().build, RayConfig(replicas=1, start_timeout_s=120, local_object_store_mb=100),
                         verbose=False)
    try:
        gcs = ray.get_runtime_context().gcs_address
        assert gcs.startswith("127.0.0.1:")
        assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
        assert not serve.status().proxies  # Serve's HTTP proxy stays off
        raylet_seen = False
        deadline = time.monotonic() + 30  # the agents open their ports shortly after start
        node = ray._private.worker._global_node  # this instance's processes: its own and their children
        roots = {info.process.pid for infos in node.all_processes.values() for info in infos}
        while True:
            pids = {os.getpid(), *roots, *(child for root in roots for child in descendants(root))}
            sockets = listening_sockets(pids)
            raylet_seen = any("raylet" in command(pid) for pid, _, _ in sockets)
            if raylet_seen and len({pid for pid, _, _ in sockets}) >= 4 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert raylet_seen and sockets
        exposed = [(pid, command(pid), ip, port) for pid, ip, port in sockets if ip not in LOOPBACK_ADDRESSES]
        assert not exposed, f"Ray processes listening beyond loopback: {exposed}"
        assert not [s for s in sockets if s[2] == 8000], "an HTTP proxy listens on Serve's port 8000"
        # the GCS refuses a client without the instance's token (a fresh process, no token anywhere)
        probe = ("from ray._raylet import GcsClient\nfrom ray.exceptions import AuthenticationError\n"
                 f"try:\n    GcsClient(address={gcs!r})\nexcept AuthenticationError:\n    print('REFUSED')\n"
                 "else:\n    print('ACCEPTED')\n")
        env = {k: v for k, v in os.environ.items() if k not in AUTH_ENV}
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
        assert "REFUSED" in out.stdout, out.stdout + out.stderr[-2000:]
    finally:
        backend.close()
    assert not ray.is_initialized()
    assert "RAY_AUTH_TOKEN" not in os.environ  # the instance's token never outlives it in this process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def token_head(clean_auth_env):
    """A real head node on 127.0.0.1 that requires token ``T0K3N...``: (address, token)."""
    token = "T0K3N" + "a" * 59
    port = free_port()
    temp = tempfile.mkdtemp(prefix="ps-ray-", dir="/tmp")  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if k not in AUTH_ENV}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               PYTHONPATH=os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH")) if p))  # workers: this module
    log = open(os.path.join(temp, "head.log"), "wb")  # noqa: SIM115 - closed in the finally below
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         "--port", str(port), "--num-cpus", "1", "--object-store-memory", str(80 * 2**20),
         "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    started: set[int] = set()
    try:
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in Path(log.name).read_text(errors="replace"):  # GCS and raylet are up
            assert head.poll() is None, "ray start --head exited: " + Path(log.name).read_text(errors="replace")[-2000:]
            assert time.monotonic() < deadline, "the token-auth head did not start within 90 s"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", token
    finally:
        started = descendants(head.pid)
        head.send_signal(signal.SIGTERM)  # --block: stops the node's processes
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(10)
        for pid in started:  # anything it left behind, by id
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def test_joining_a_token_cluster_without_or_with_a_wrong_token_is_one_clear_error(token_head, tmp_path,
                                                                                   monkeypatch):
    import ray

    from policyserve.cluster.pool import DistributedConfig, actor_spawner

    address, token = token_head
    start = time.monotonic()
    with pytest.raises(RayAuthError) as missing:
        join_ray(address)
    assert time.monotonic() - start < 8
    message = str(missing.value)
    assert "\n" not in message
    assert f"the Ray cluster at {address} requires a token (InvalidAuthToken)" in message
    assert "RAY_AUTH_MODE=token" in message and "RAY_AUTH_TOKEN" in message
    assert not ray.is_initialized()

    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="W" * 64)
    with pytest.raises(RayAuthError, match=r"refused this process's token \(InvalidAuthToken\)"):
        join_ray(address)
    assert time.monotonic() - start < 16

    os.environ["RAY_AUTH_TOKEN"] = token  # the right token joins
    connection = join_ray(address)
    try:
        assert connection.connected and not connection.local

        class Worker:  # defined here: shipped by value; reports what it was given and where it runs
            def __init__(self, config: _Inner, env_vars: dict) -> None:
                self.config = config

            def where(self) -> tuple[str, str, bool]:
                return self.config.hdf5_path, os.getcwd(), os.path.exists(self.config.hdf5_path)

        (tmp_path / "demos.hdf5").write_bytes(b"")
        monkeypatch.chdir(tmp_path)  # the driver's directory; the worker runs in the head's
        spawn = actor_spawner(ray, Worker, DistributedConfig(workers=1, address=address), _Inner("demos.hdf5"))
        path, cwd, exists = ray.get(spawn(0).where.remote(), timeout=120)
        assert cwd != str(tmp_path) and path == str(tmp_path / "demos.hdf5") and exists
    finally:
        ray.shutdown()


def test_joining_an_address_where_nothing_answers_fails_within_the_bound(clean_auth_env, monkeypatch):
    import ray

    monkeypatch.setattr(runtime, "TOKEN_CHECK_S", 2.0)
    start = time.monotonic()
    with pytest.raises(runtime.RayUnavailableError, match=r"could not reach the Ray cluster at 127\.0\.0\.1:\d+: "
                       r"its GCS did not answer within 2 s"):
        join_ray(f"127.0.0.1:{free_port()}")
    assert time.monotonic() - start < 10 and not ray.is_initialized()


@dataclass(frozen=True)
class _Inner:
    hdf5_path: str = ""
    task: str = "lift"


@dataclass(frozen=True)
class _Outer:
    model_path: str | None = None
    dataset_path: str | None = None
    video_dir: str | None = None
    name: str = "demos.hdf5"
    inner: _Inner = field(default_factory=_Inner)


def test_relative_paths_become_absolute_for_workers(tmp_path, monkeypatch):
    (tmp_path / "demos.hdf5").write_bytes(b"")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "videos").mkdir()
    monkeypatch.chdir(tmp_path)
    config = _Outer(model_path="ckpt", dataset_path="nvidia/some-hub-id", video_dir="videos/../videos",
                    inner=_Inner(hdf5_path="demos.hdf5"))
    shipped = absolute_paths(config)
    assert shipped.model_path == str(tmp_path / "ckpt")
    assert shipped.video_dir == str(tmp_path / "videos")
    assert shipped.inner.hdf5_path == str(tmp_path / "demos.hdf5")
    assert shipped.dataset_path == "nvidia/some-hub-id"  # not a local path: left for the hub / the nodes
    assert shipped.name == "demos.hdf5" and shipped.inner.task == "lift"  # not a path field
    assert absolute_paths(shipped) == shipped and absolute_paths(3) == 3
    assert absolute_paths(_Outer()) == _Outer()
    from policyserve.serving.spec import PolicySpec  # what `serve --replicas` ships

    spec = absolute_paths(PolicySpec(model_path="ckpt", policy="scripted:lift"))
    assert spec.model_path == str(tmp_path / "ckpt") and spec.policy == "scripted:lift"
