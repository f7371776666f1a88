"""TLS on the openpi door (issue 17 item 8): ``tls_cert``/``tls_key`` (``--tls-cert``/``--tls-key``) serve
``wss://``; tested with the real openpi client, which takes a ``wss://`` URI as its host and verifies the
server against the default CA paths (``SSL_CERT_FILE`` points them at the test's self-signed certificate).
The certificate is generated here with ``cryptography``.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import time

import pytest
import websockets
from openpi_client.websocket_client_policy import WebsocketClientPolicy

from policyserve import ConfigError, ConstantPolicy, PolicyServer
from policyserve.registry import get_embodiment_spec
from policyserve.serving.doors.openpi import OpenpiFrontDoor

from test_openpi import franka_openpi_obs

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

pytestmark = pytest.mark.timeout(120)
SPEC = get_embodiment_spec("franka_panda")


def self_signed(tmp_path, name: str = "policyserve-test") -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key (PEM files)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def start(**config) -> tuple[PolicyServer, OpenpiFrontDoor]:
    server = PolicyServer(ConstantPolicy(SPEC.modality_configs, SPEC.dims), port=None, verbose=False, **config)
    door = OpenpiFrontDoor(port=0)
    server.add_front_door(door)
    server.start()
    return server, door


def round_trip_ms(client: WebsocketClientPolicy, n: int = 50) -> float:
    obs = franka_openpi_obs()
    client.infer(obs)
    started = time.perf_counter()
    for _ in range(n):
        client.infer(obs)
    return (time.perf_counter() - started) / n * 1000


def test_openpi_client_over_wss_with_the_servers_certificate(tmp_path, monkeypatch):
    cert, key = self_signed(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", cert)  # the client's default context trusts this certificate
    server, door = start(tls_cert=cert, tls_key=key, api_token="robot-secret")
    plain_server, plain_door = start(api_token="robot-secret")
    try:
        assert door.scheme == "wss"
        client = WebsocketClientPolicy(f"wss://127.0.0.1:{door.port}", api_key="robot-secret")
        assert client.get_server_metadata()["action_horizon"] == 16
        reply = client.infer(franka_openpi_obs())
        assert reply["actions"].shape == (16, 7)
        # a plain ws:// client cannot talk to the TLS door; the TLS door still serves
        with pytest.raises((websockets.InvalidMessage, websockets.InvalidHandshake, ConnectionError, EOFError)):
            WebsocketClientPolicy("127.0.0.1", door.port, api_key="robot-secret")
        # the token still counts over TLS
        with pytest.raises(websockets.InvalidStatus, match="401"):
            WebsocketClientPolicy(f"wss://127.0.0.1:{door.port}", api_key="wrong")
        plain = WebsocketClientPolicy("127.0.0.1", plain_door.port, api_key="robot-secret")
        tls_ms, plain_ms = round_trip_ms(client), round_trip_ms(plain)
        print(f"\nopenpi round trip (32x32 images, constant policy): ws {plain_ms:.2f} ms, wss {tls_ms:.2f} ms")
        assert client.infer(franka_openpi_obs())["actions"].shape == (16, 7)
    finally:
        server.stop(10)
        plain_server.stop(10)


def test_a_client_that_does_not_trust_the_certificate_is_refused_and_others_served(tmp_path, monkeypatch):
    cert, key = self_signed(tmp_path)
    other_cert, _ = self_signed(tmp_path, "someone-else")
    server, door = start(tls_cert=cert, tls_key=key)
    try:
        monkeypatch.setenv("SSL_CERT_FILE", other_cert)
        with pytest.raises(ssl.SSLCertVerificationError):
            WebsocketClientPolicy(f"wss://127.0.0.1:{door.port}")
        monkeypatch.setenv("SSL_CERT_FILE", cert)
        client = WebsocketClientPolicy(f"wss://127.0.0.1:{door.port}")
        assert client.infer(franka_openpi_obs())["actions"].shape == (16, 7)
    finally:
        server.stop(10)


def test_tls_files_that_cannot_be_loaded_fail_the_bind_naming_the_field(tmp_path):
    cert, key = self_signed(tmp_path)
    with pytest.raises(ConfigError, match="tls_cert .*missing.crt is not a file"):
        start(tls_cert=str(tmp_path / "missing.crt"), tls_key=key)
    with pytest.raises(ConfigError, match="tls_key .*missing.key is not a file"):
        start(tls_cert=cert, tls_key=str(tmp_path / "missing.key"))
    (tmp_path / "junk.crt").write_text("not a certificate")
    with pytest.raises(ConfigError, match="tls_cert .*junk.crt and tls_key .* cannot be loaded"):
        start(tls_cert=str(tmp_path / "junk.crt"), tls_key=key)
    with pytest.raises(ConfigError, match="tls_key needs tls_cert"):
        start(tls_key=key)


def test_cli_serve_tls_flags_serve_wss_and_the_limits_are_flags(tmp_path, monkeypatch):
    import re
    import signal
    import subprocess
    import sys

    from serve_process import serve_process

    help_text = subprocess.run([sys.executable, "-m", "policyserve", "serve", "--help"], capture_output=True,
                               text=True, timeout=120).stdout
    for flag in ("--tls-cert", "--tls-key", "--max-connections", "--max-pending-connections", "--open-timeout",
                 "--idle-timeout", "--max-unsent", "--metrics-token"):
        assert flag in help_text, flag
    cert, key = self_signed(tmp_path)
    ready = re.compile(r"openpi clients: listening on wss://[\d.]+:(\d+)")
    with serve_process("--protocol", "openpi", "--tls-cert", cert, "--tls-key", key, "--max-connections", "4",
                       ready=ready) as (proc, port):
        monkeypatch.setenv("SSL_CERT_FILE", cert)
        client = WebsocketClientPolicy(f"wss://127.0.0.1:{port}")
        assert client.infer(franka_openpi_obs())["actions"].shape == (16, 7)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    bad = subprocess.run([sys.executable, "-m", "policyserve", "serve", "--protocol", "openpi", "--port", "0",
                          "--tls-cert", str(tmp_path / "missing.pem")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "--tls-cert" in bad.stderr and "missing.pem is not a file" in bad.stderr


def test_idle_sockets_on_the_tls_port_drop_each_other_not_admitted_clients(tmp_path, monkeypatch):
    import select
    import socket

    cert, key = self_signed(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", cert)
    server, door = start(tls_cert=cert, tls_key=key, max_pending_connections=3)
    socks = []
    try:
        client = WebsocketClientPolicy(f"wss://127.0.0.1:{door.port}")  # admitted: no longer pending
        socks = [socket.create_connection(("127.0.0.1", door.port), timeout=10) for _ in range(8)]

        def dropped(s: socket.socket) -> bool:
            if not select.select([s], [], [], 0)[0]:
                return False
            try:
                return s.recv(1, socket.MSG_PEEK) == b""
            except ConnectionError:
                return True

        deadline = time.monotonic() + 10
        while sum(dropped(s) for s in socks[:5]) < 5:  # the 5 oldest silent sockets, never the admitted client
            assert time.monotonic() < deadline, "oldest idle TLS sockets were not dropped"
            time.sleep(0.01)
        assert client.infer(franka_openpi_obs())["actions"].shape == (16, 7)
        assert WebsocketClientPolicy(f"wss://127.0.0.1:{door.port}").infer(franka_openpi_obs())["actions"].shape \
            == (16, 7)
    finally:
        for s in socks:
            s.close()
        server.stop(10)
