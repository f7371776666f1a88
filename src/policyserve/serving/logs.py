"""Safe, rate-limited error logging for the server.

Client-supplied text reaches the log only through :func:`safe_text` (escaped: no newlines or terminal
escape codes can forge a line; cut to a bounded length; heap addresses masked), and
:class:`RateLimitedLog` prints at most one line per kind of error per interval (default 1 s), the next
line saying how many of that kind it suppressed meanwhile. A client that sends a million bad requests
therefore writes a few lines per second, not a line per request.
"""

from __future__ import annotations

import re
import sys
import threading
import time
import traceback
from typing import TextIO

__all__ = ["RateLimitedLog", "SERVER_LOG", "safe_text"]

MAX_LINE_CHARS = 1000
"""Longest message :class:`RateLimitedLog` writes (client text inside it is cut far shorter)."""

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def safe_text(text: str, limit: int = MAX_LINE_CHARS) -> str:
    """``text`` on one line: control characters (newlines, ESC) escaped, heap addresses masked, cut to ``limit``
    characters with the full length noted."""
    shown = _ADDRESS.sub("", text)
    if not shown.isprintable():
        shown = "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                        for c in shown)
    return shown if len(shown) <= limit else shown[:limit] + f"... ({len(shown)} characters)"


class RateLimitedLog:
    """Writes at most one line per ``kind`` every ``interval`` seconds to ``stream`` (default stdout)."""

    MAX_KINDS = 256
    """Kinds tracked at once (kinds are server-chosen names, but bounded anyway)."""

    def __init__(self, interval: float = 1.0, stream: TextIO | None = None) -> None:
        self.interval = interval
        self.stream = stream
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def error(self, kind: str, message: str, exc: BaseException | None = None) -> bool:
        """Log ``message`` (made safe) unless a line of ``kind`` was written less than ``interval`` ago; with
        ``exc``, its traceback follows (made safe, line by line). True when the line was written."""
        now = time.monotonic()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self.interval:
                self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
                return False
            if last is None and len(self._last) >= self.MAX_KINDS:
                oldest = min(self._last, key=self._last.__getitem__)
                self._last.pop(oldest)
                self._suppressed.pop(oldest, None)
            self._last[kind] = now
            suppressed = self._suppressed.pop(kind, 0)
        line = safe_text(message)
        if suppressed:
            line += f" ({suppressed} more like this in the last {self.interval:g} s not shown)"
        lines = [line]
        if exc is not None:
            lines += [safe_text(t.rstrip("\n"), 300) for chunk in traceback.format_exception(exc)
                      for t in chunk.splitlines()][-40:]
        stream = self.stream or sys.stdout
        try:
            stream.write("\n".join(lines) + "\n")
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken log stream must not fail a request
        return True


SERVER_LOG = RateLimitedLog()
"""The log every door and the scheduler's error listener write request errors to."""
