"""``policyserve`` command line: one module per sub-command under ``policyserve.cli``.

Each command module exposes ``register(subparsers)``, which adds its parser and sets
``func=<callable(args) -> int>``. Heavy imports (torch, MuJoCo, pyarrow) stay inside the callables
so that ``policyserve --help`` and the client-only install stay light. Bad input that reaches a command as a
policyserve error, ``OSError`` or ``ValueError`` is answered here with one ``error: ...`` line and exit code 1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..errors import PolicyServeError

COMMANDS = ("serve", "dataset", "convert", "record", "rollout", "compare", "train", "demo")
SIM_COMMANDS = ("serve", "record", "rollout", "compare", "demo")
"""Commands that may build simulated envs: they take ``--verbose`` for robosuite's own messages."""
SIM_VERBOSE_ENV = "POLICYSERVE_SIM_VERBOSE"  # read by policyserve.sim.verbosity, inherited by subprocesses


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="policyserve",
        description="Serve, replay and evaluate robot policies over GR00T's ZeroMQ wire protocol.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"policyserve.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"policyserve.cli.{name}":
                continue
            raise
        module.register(sub)
        if name in SIM_COMMANDS:
            sub.choices[name].add_argument("--verbose", action="store_true",
                                           help="show robosuite's info lines and warnings (quiet by default)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if getattr(args, "verbose", False):
        os.environ[SIM_VERBOSE_ENV] = "1"
    try:
        return int(args.func(args) or 0)
    except (PolicyServeError, OSError, ValueError) as exc:
        print(f"error: {error_line(exc)}", file=sys.stderr, flush=True)
        return 1


def error_line(exc: BaseException) -> str:
    """The exception as one line; errors not raised by policyserve are prefixed with their type."""
    text = " ".join(str(exc).split()) or "(no message)"
    return text if isinstance(exc, PolicyServeError) else f"{type(exc).__name__}: {text}"


if __name__ == "__main__":
    sys.exit(main())
