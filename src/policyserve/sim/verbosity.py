"""Quiet robosuite's console chatter unless verbose output is asked for.

robosuite logs, on every import and env build, warnings that do not concern the built-in Panda tasks
(no private macro file, no ``robosuite_models``, no mink IK for the GR1 robot) and an INFO line per
controller config it loads. A filter on its logger drops those unless verbose; any other robosuite
warning or error still shows. Verbose is on when the environment variable ``POLICYSERVE_SIM_VERBOSE``
is set to anything but "", "0" or "false", or after ``set_verbose(True)`` (which also sets the variable,
so worker processes started afterwards inherit it).
"""

from __future__ import annotations

import logging
import os

ENV_VAR = "POLICYSERVE_SIM_VERBOSE"
ROBOSUITE_LOGGER = "robosuite_logs"
QUIET_WARNINGS = ("macro file", "setup_macros.py", "robosuite_models", "mink-based whole-body IK")
"""Substrings of the robosuite warnings dropped when not verbose."""


def is_verbose() -> bool:
    """Whether robosuite's info lines and irrelevant warnings are shown."""
    return os.environ.get(ENV_VAR, "").strip().lower() not in ("", "0", "false")


def set_verbose(verbose: bool = True) -> None:
    """Show (True) or quiet (False) robosuite's info lines and irrelevant warnings, here and in later workers."""
    os.environ[ENV_VAR] = "1" if verbose else "0"


class _QuietFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if is_verbose() or record.levelno > logging.WARNING:
            return True
        if record.levelno < logging.WARNING:
            return False
        message = record.getMessage()
        return not any(text in message for text in QUIET_WARNINGS)


def install_filter() -> None:
    """Attach the filter to robosuite's logger (idempotent; works before robosuite is imported)."""
    logger = logging.getLogger(ROBOSUITE_LOGGER)
    if not any(isinstance(f, _QuietFilter) for f in logger.filters):
        logger.addFilter(_QuietFilter())
