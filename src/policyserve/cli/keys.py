"""``policyserve keys generate DIR``: write a CurveZMQ key pair for encrypted GR00T-wire links."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    """Add the ``keys`` command and its ``generate`` sub-command."""
    parser = subparsers.add_parser("keys", help="make CurveZMQ key pairs (encrypted, authenticated links)")
    sub = parser.add_subparsers(dest="keys_command", metavar="SUBCOMMAND")
    generate = sub.add_parser(
        "generate", help="write NAME.key (public: give it to the other side) and NAME.key_secret (keep it private)",
        description="Write a CurveZMQ key pair. A server runs with --curve-secret-key DIR/NAME.key_secret; its "
        "clients pass curve_server_key=DIR/NAME.key. To admit only known clients, put each client's NAME.key in "
        "one folder and start the server with --curve-authorized-keys FOLDER; clients then also pass "
        "curve_key_pair=their NAME.key_secret.")
    generate.add_argument("directory", help="folder to write the key files to (made if missing)")
    generate.add_argument("--name", default="policyserve", help="file name stem (default: policyserve)")
    generate.set_defaults(func=run)
    parser.set_defaults(func=lambda args: _usage(parser))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def run(args: argparse.Namespace) -> int:
    """Write the key pair and say where it went."""
    from ..security import generate_keys, load_public_key

    public, secret = generate_keys(args.directory, args.name)
    print(f"public key: {public}  ({load_public_key(public).decode()})")
    print(f"secret key: {secret}  (keep private; mode 600)")
    return 0
