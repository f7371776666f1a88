"""CurveZMQ: key files, server set-up helpers and the client, over loopback against a plain REP server."""

from __future__ import annotations

import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from policyserve.cli.main import main
from policyserve.client.policy_client import PolicyClient
from policyserve.errors import ConfigError, PolicyTimeoutError
from policyserve.security import CurveClientKeys, curve_server, generate_keys, load_key_pair, load_public_key
from policyserve.wire.gr00t import packb, unpackb


class CurveRepServer:
    """A GR00T-style REP server (ping, echo) made a CURVE server with :func:`curve_server`."""

    def __init__(self, secret_key_file: Path, authorized_keys_dir: Path | None) -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.REP)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.curve = curve_server(self.context, self.socket, secret_key_file, authorized_keys_dir)
        self.port = self.socket.bind_to_random_port("tcp://127.0.0.1")
        self.requests = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.socket.poll(50):
                continue
            request = unpackb(self.socket.recv())
            self.requests += 1
            if request.get("endpoint") == "ping":
                self.socket.send(packb({"status": "ok", "message": "Server is running"}))
            else:
                self.socket.send(packb([request.get("data"), {}]))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.socket.close(0)
        self.curve.stop()
        self.context.term()


@pytest.fixture()
def keys(tmp_path: Path) -> dict[str, Path]:
    server_public, server_secret = generate_keys(tmp_path / "server", "server")
    client_public, client_secret = generate_keys(tmp_path / "client", "robot")
    _, stranger_secret = generate_keys(tmp_path / "stranger", "stranger")
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    (authorized / "robot.key").write_bytes(client_public.read_bytes())
    return {"server_public": server_public, "server_secret": server_secret, "client_secret": client_secret,
            "stranger_secret": stranger_secret, "authorized": authorized}


@pytest.fixture()
def restricted(keys: dict[str, Path]) -> Iterator[CurveRepServer]:
    server = CurveRepServer(keys["server_secret"], keys["authorized"])
    yield server
    server.close()


def test_keys_generate_command_writes_a_private_key_pair(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["keys", "generate", str(tmp_path / "k"), "--name", "lab"]) == 0
    public, secret = tmp_path / "k" / "lab.key", tmp_path / "k" / "lab.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert load_public_key(public) == load_key_pair(secret)[0]
    assert load_public_key(public).decode() in capsys.readouterr().out
    assert main(["keys", "generate", str(tmp_path / "k"), "--name", "lab"]) == 2  # never overwrites
    assert "already exist" in capsys.readouterr().err


def test_key_loading_errors_name_the_problem(keys: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no key file"):
        load_public_key(tmp_path / "missing.key")
    with pytest.raises(ConfigError, match="holds no secret key"):
        load_key_pair(keys["server_public"])
    (tmp_path / "junk.key").write_text("not a key")
    with pytest.raises(ConfigError, match="not a ZeroMQ key file|holds no"):
        load_key_pair(tmp_path / "junk.key")
    with pytest.raises(ConfigError, match="z85"):
        load_key_pair(("short", "keys"))
    public = load_public_key(keys["server_public"])
    assert load_public_key(public) == load_public_key(public.decode()) == public  # z85 text works as well
    empty = tmp_path / "empty"
    empty.mkdir()
    context = zmq.Context()
    sock = context.socket(zmq.REP)
    try:
        with pytest.raises(ConfigError, match="no public key files"):
            curve_server(context, sock, keys["server_secret"], empty)
        with pytest.raises(ConfigError, match="not a directory"):
            curve_server(context, sock, keys["server_secret"], tmp_path / "nope")
    finally:
        sock.close(0)
        context.term()


def test_authorized_client_talks_encrypted(restricted: CurveRepServer, keys: dict[str, Path]) -> None:
    with PolicyClient("127.0.0.1", restricted.port, timeout_ms=5000, curve_server_key=keys["server_public"],
                      curve_key_pair=keys["client_secret"]) as client:
        assert client.ping()
        action, _ = client.get_action({"x": 1})
        assert action == {"observation": {"x": 1}, "options": None}


@pytest.mark.parametrize("who", ["plain client", "unauthorized key", "no key pair", "wrong server key"])
def test_other_clients_cannot_talk(restricted: CurveRepServer, keys: dict[str, Path], who: str) -> None:
    options: dict = {
        "plain client": {},
        "unauthorized key": {"curve_server_key": keys["server_public"], "curve_key_pair": keys["stranger_secret"]},
        "no key pair": {"curve_server_key": keys["server_public"]},
        "wrong server key": {"curve_server_key": zmq.curve_keypair()[0], "curve_key_pair": keys["client_secret"]},
    }[who]
    with PolicyClient("127.0.0.1", restricted.port, timeout_ms=500, **options) as client:
        assert not client.ping()
        with pytest.raises(PolicyTimeoutError, match="CURVE keys" if options else "no reply"):
            client.get_action({"x": 1})
    assert restricted.requests == 0  # nothing reached the server


def test_server_without_authorized_keys_admits_any_client_that_knows_its_key(keys: dict[str, Path]) -> None:
    server = CurveRepServer(keys["server_secret"], None)
    try:
        assert server.curve.authorized_keys is None and server.curve.authenticator is None
        with PolicyClient("127.0.0.1", server.port, timeout_ms=5000, curve_server_key=keys["server_public"]) as c:
            assert c.ping()  # a fresh key pair is fine here
        with PolicyClient("127.0.0.1", server.port, timeout_ms=500) as plain:
            assert not plain.ping()  # but plain text is not
    finally:
        server.close()


def test_client_keys_are_resolved_once_and_checked(keys: dict[str, Path]) -> None:
    loaded = CurveClientKeys.load(keys["server_public"], keys["client_secret"])
    assert loaded.public_key == load_public_key(keys["client_secret"])
    with pytest.raises(ConfigError, match="needs curve_server_key"):
        PolicyClient("127.0.0.1", 1, curve_key_pair=keys["client_secret"])


def test_policy_server_with_curve_admits_only_authorized_clients(keys: dict[str, Path]) -> None:
    from helpers import SPEC, franka_observation
    from policyserve import ConstantPolicy
    from policyserve.serving.server import PolicyServer

    server = PolicyServer(ConstantPolicy(SPEC.modality_configs, SPEC.dims), host="127.0.0.1", port=0, verbose=False,
                          curve_secret_key=str(keys["server_secret"]), curve_authorized_keys=str(keys["authorized"]))
    port = server.start()
    try:
        with PolicyClient("127.0.0.1", port, timeout_ms=5000, curve_server_key=keys["server_public"],
                          curve_key_pair=keys["client_secret"]) as robot:
            action, _ = robot.get_action(franka_observation(batch=2))
            assert action["arm"].shape[0] == 2
        for options in ({}, {"curve_server_key": keys["server_public"], "curve_key_pair": keys["stranger_secret"]}):
            with PolicyClient("127.0.0.1", port, timeout_ms=500, **options) as other:
                assert not other.ping()
    finally:
        server.stop()
