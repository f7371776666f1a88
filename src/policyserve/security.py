"""CurveZMQ keys for encrypted, authenticated GR00T-wire links (off unless configured).

Key files are ZeroMQ's certificate files (``zmq.auth.create_certificates``): ``NAME.key`` holds the
public key, ``NAME.key_secret`` the public and secret keys, both z85 text. A server needs its secret
key file and, to admit only known clients, a directory of client public key files; a client needs
the server's public key and, for such a server, its own key pair.

Nothing here imports the serving layer: a door calls :func:`curve_server` on its socket before it
binds, and :meth:`CurveServer.stop` at shutdown.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import zmq

from .errors import ConfigError

KeySource = Union[str, bytes, os.PathLike]
"""A z85 key (40 characters, str or bytes) or the path of a key file."""

Z85_KEY_LENGTH = 40


def generate_keys(directory: str | os.PathLike, name: str = "policyserve") -> tuple[Path, Path]:
    """Write a new key pair to ``directory`` (made if missing): (public key file, secret key file).

    Refuses to overwrite an existing pair of that name.
    """
    import zmq.auth

    folder = Path(directory)
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    if public.exists() or secret.exists():
        raise ConfigError(f"key files for {name!r} already exist in {folder} (pick another name or directory)")
    folder.mkdir(parents=True, exist_ok=True)
    made_public, made_secret = zmq.auth.create_certificates(str(folder), name)
    os.chmod(made_secret, 0o600)
    return Path(made_public), Path(made_secret)


def _z85(value: str | bytes, what: str) -> bytes | None:
    """``value`` as a z85 key, or None when it is not shaped like one (then it may be a path)."""
    raw = value.encode("ascii", "replace") if isinstance(value, str) else bytes(value)
    if len(raw) != Z85_KEY_LENGTH:
        return None
    try:
        zmq.utils.z85.decode(raw)
    except (ValueError, KeyError, TypeError):
        return None
    return raw


def _read_key_file(path: Path, what: str) -> tuple[bytes, bytes | None]:
    import zmq.auth

    if not path.is_file():
        raise ConfigError(f"{what}: no key file at {str(path)[:200]!r}")
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{what}: {str(path)[:200]!r} is not a ZeroMQ key file ({str(exc)[:200]})") from None
    return public, secret


def load_public_key(source: KeySource, what: str = "public key") -> bytes:
    """The z85 public key in ``source``: a z85 key, or a key file (public or secret)."""
    if isinstance(source, (str, bytes)):
        key = _z85(source, what)
        if key is not None:
            return key
    return _read_key_file(Path(os.fsdecode(source)), what)[0]


def load_key_pair(source: KeySource | tuple[str | bytes, str | bytes], what: str = "key pair") -> tuple[bytes, bytes]:
    """(public, secret) z85 keys from a secret key file or a (public, secret) pair of z85 keys."""
    if isinstance(source, tuple):
        if len(source) != 2:
            raise ConfigError(f"{what}: expected (public, secret) z85 keys, got {len(source)} values")
        keys = [_z85(k, what) for k in source]
        if keys[0] is None or keys[1] is None:
            raise ConfigError(f"{what}: keys must be {Z85_KEY_LENGTH}-character z85 strings")
        return keys[0], keys[1]
    path = Path(os.fsdecode(source))
    public, secret = _read_key_file(path, what)
    if not secret:
        raise ConfigError(f"{what}: {str(path)[:200]!r} holds no secret key (use the '.key_secret' file)")
    return public, secret


@dataclass
class CurveServer:
    """CURVE set up on one server socket; :meth:`stop` ends its authenticator thread (if any)."""

    public_key: bytes
    """The server's z85 public key: what clients need."""
    authorized_keys: int | None
    """Client keys admitted from the authorized-keys directory; None when any client key is admitted."""
    authenticator: object | None = None

    def stop(self) -> None:
        """Stop the authenticator thread; idempotent."""
        if self.authenticator is not None:
            self.authenticator.stop()  # type: ignore[attr-defined]
            self.authenticator = None


def curve_server(
    context: zmq.Context,
    socket: zmq.Socket,
    secret_key_file: str | os.PathLike,
    authorized_keys_dir: str | os.PathLike | None = None,
) -> CurveServer:
    """Make ``socket`` (not yet bound) a CURVE server with the key pair in ``secret_key_file``.

    With ``authorized_keys_dir`` only clients whose public key file (``*.key``) is in that directory
    can connect (a ``zmq.auth`` authenticator thread on ``context`` checks them); others fail the
    handshake and never reach the server. Without it any client that knows the server's public key
    can connect, and the link is still encrypted.
    """
    public, secret = load_key_pair(secret_key_file, "curve_secret_key")
    authenticator = None
    admitted: int | None = None
    if authorized_keys_dir is not None:
        folder = Path(authorized_keys_dir)
        if not folder.is_dir():
            raise ConfigError(f"curve_authorized_keys: {str(folder)[:200]!r} is not a directory")
        admitted = len(list(folder.glob("*.key")))
        if admitted == 0:
            raise ConfigError(f"curve_authorized_keys: {str(folder)[:200]!r} holds no public key files (*.key); "
                              "no client could connect")
        from zmq.auth.thread import ThreadAuthenticator

        authenticator = ThreadAuthenticator(context)
        authenticator.start()
        authenticator.configure_curve(domain="*", location=str(folder))
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_server = True
    return CurveServer(public, admitted, authenticator)


@dataclass(frozen=True)
class CurveClientKeys:
    """A client's CURVE keys, resolved once and applied to each socket it makes."""

    server_key: bytes
    public_key: bytes
    secret_key: bytes

    @classmethod
    def load(cls, server_key: KeySource,
             key_pair: KeySource | tuple[str | bytes, str | bytes] | None = None) -> CurveClientKeys:
        """Keys for a client of the server whose public key is ``server_key``.

        Without ``key_pair`` the client uses a fresh key pair, which a server that admits only
        authorized keys refuses.
        """
        server = load_public_key(server_key, "curve_server_key")
        public, secret = load_key_pair(key_pair, "curve_key_pair") if key_pair is not None else zmq.curve_keypair()
        return cls(server, public, secret)

    def apply(self, socket: zmq.Socket) -> None:
        """Make ``socket`` (not yet connected) a CURVE client with these keys."""
        socket.curve_serverkey = self.server_key
        socket.curve_publickey = self.public_key
        socket.curve_secretkey = self.secret_key
