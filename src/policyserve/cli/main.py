"""``policyserve`` command line: one module per sub-command under ``policyserve.cli``.

Each command module exposes ``register(subparsers)``, which adds its parser and sets
``func=<callable(args) -> int>``; a command may also set ``error_hint=<callable(exc, args) -> str | None>``
(what to do, in flags, added to the error line; it replaces the advice of an error that has a ``summary``)
and ``interrupted_note`` (said on Ctrl-C). Heavy imports (torch, MuJoCo,
pyarrow) stay inside the callables so that ``policyserve --help`` and the client-only install stay light.

Commands do not catch errors: :data:`EXIT_CODES` (here, once) turns what they raise into one
``error: ...`` line and an exit code (bad input 2, a failure while running 1, Ctrl-C 130), naming the
command's flags where a library error names a config field.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any

from ..errors import ConfigError, PolicyServeError, ValidationError
from .flags import FIELD_FLAGS, Parser, RawDescriptionHelpFormatter, name_flags

COMMANDS = ("serve", "dataset", "convert", "record", "rollout", "compare", "train", "demo", "keys")
SIM_COMMANDS = ("serve", "record", "rollout", "compare", "demo")
"""Commands that may build simulated envs: they take ``--verbose`` for robosuite's own messages."""
SIM_VERBOSE_ENV = "POLICYSERVE_SIM_VERBOSE"  # read by policyserve.sim.verbosity, inherited by subprocesses

BAD_INPUT, FAILED, INTERRUPTED = 2, 1, 130


class UsageError(Exception):
    """The command line does not parse (argparse's message, for the parser that refused it)."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser


EXIT_CODES: tuple[tuple[type[BaseException] | str, int], ...] = (
    (KeyboardInterrupt, INTERRUPTED),
    (UsageError, BAD_INPUT),
    (argparse.ArgumentError, BAD_INPUT),
    (argparse.ArgumentTypeError, BAD_INPUT),
    (ConfigError, BAD_INPUT),
    (ValidationError, BAD_INPUT),
    ("policyserve.data.lerobot:DatasetError", BAD_INPUT),  # not a dataset / HDF5 file, output not empty
    ("policyserve.data.video:VideoError", BAD_INPUT),
    ("policyserve.client.connect:ServerUnavailableError", BAD_INPUT),  # nothing answers at --host/--port
    (PolicyServeError, FAILED),
    (OSError, FAILED),
    (ValueError, FAILED),
    (RuntimeError, FAILED),
    (ImportError, FAILED),
)
"""Error type -> exit code, first match wins; ``"module:Name"`` entries are looked up only if that module was
imported (an error of its type cannot exist otherwise). Errors of other types are bugs and keep their
traceback."""

EXTRAS = {"torch": "model", "safetensors": "model", "websockets": "serve", "prometheus_client": "serve",
          "ray": "ray", "mujoco": "sim", "robosuite": "sim", "gymnasium": "sim", "pyarrow": "data", "h5py": "data",
          "av": "data", "matplotlib": "eval"}
"""Top-level module -> the extra of ``pip install 'policyserve[EXTRA]'`` that installs it."""


def exit_code(exc: BaseException) -> int | None:
    """The exit code :data:`EXIT_CODES` gives ``exc``; None for errors that are bugs (also a policyserve module
    that does not import)."""
    if isinstance(exc, ImportError) and (exc.name or "").split(".")[0] == "policyserve":
        return None
    for kind, code in EXIT_CODES:
        if isinstance(kind, str):
            module, _, name = kind.partition(":")
            kind = getattr(sys.modules.get(module), name, None)  # type: ignore[assignment]
            if kind is None:
                continue
        if isinstance(exc, kind):  # type: ignore[arg-type]
            return code
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="policyserve",
        description="Serve, replay and evaluate robot policies over GR00T's ZeroMQ wire protocol.\n\n"
        "Every flag also takes GR00T's underscore spelling (--model_path, --embodiment_tag); bool flags take "
        "--x, --x True/False and --no-x. Exit codes: 0 done, 2 bad input, 1 failed while running, 130 Ctrl-C.",
        formatter_class=RawDescriptionHelpFormatter,
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
    for command in sub.choices.values():
        _raise_usage_errors(command)
    _raise_usage_errors(parser)
    return parser


def _raise_usage_errors(parser: argparse.ArgumentParser) -> None:
    """Parse errors of ``parser`` (and its sub-commands) raise :class:`UsageError` instead of exiting."""
    def error(message: str) -> None:
        raise UsageError(parser, message)

    parser.error = error  # type: ignore[method-assign]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                if child.error is not error:
                    _raise_usage_errors(child)


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: this program's, ``sys.argv``) and return its exit code; as the
    program (no ``argv``), a process where a Ray core worker ran exits here, skipping Ray's C-level exit
    handler that can crash after ``ray.shutdown`` (``policyserve.cluster.runtime.exit_process``)."""
    code = _run(argv)
    runtime = sys.modules.get("policyserve.cluster.runtime")
    if argv is None and runtime is not None and runtime.core_worker_ran():
        runtime.exit_process(code)
    return code


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args: Any = None
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return BAD_INPUT
        if getattr(args, "verbose", False):
            os.environ[SIM_VERBOSE_ENV] = "1"
        return int(args.func(args) or 0)
    except BaseException as exc:
        code = exit_code(exc)
        if code is None:
            raise
        report(exc, args)
        return code


def report(exc: BaseException, args: Any) -> None:
    """Print ``exc`` as the command line's one error line (usage errors as argparse prints them)."""
    if isinstance(exc, UsageError):
        exc.parser.print_usage(sys.stderr)
        print(f"{exc.parser.prog}: error: {exc}", file=sys.stderr, flush=True)
        return
    if isinstance(exc, KeyboardInterrupt):
        note = getattr(args, "interrupted_note", None)
        print(f"\nerror: interrupted{': ' + note if note else ''}", file=sys.stderr, flush=True)
        return
    if isinstance(exc, ImportError) and not isinstance(exc, PolicyServeError):
        top = (exc.name or "").split(".")[0]
        extra = EXTRAS.get(top, "all")
        print(f"error: {top or exc} is not installed (pip install 'policyserve[{extra}]')", file=sys.stderr,
              flush=True)
        return
    hint = getattr(args, "error_hint", None)
    extra = hint(exc, args) if hint is not None else None
    # an error's ``summary`` leaves out its advice to library callers; the command's hint replaces it
    line = " ".join(str(exc.summary).split()) if extra and getattr(exc, "summary", None) else error_line(exc)
    if isinstance(exc, PolicyServeError) and exit_code(exc) == BAD_INPUT:
        line = name_flags(line, getattr(args, FIELD_FLAGS, None) or {})
    print(f"error: {line}{'; ' + extra if extra else ''}", file=sys.stderr, flush=True)


def error_line(exc: BaseException) -> str:
    """The exception as one line; errors not raised by policyserve are prefixed with their type."""
    text = " ".join(str(exc).split()) or "(no message)"
    return text if isinstance(exc, PolicyServeError) else f"{type(exc).__name__}: {text}"


if __name__ == "__main__":
    sys.exit(main())
