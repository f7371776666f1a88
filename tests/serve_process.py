"""Start ``policyserve serve`` as a real subprocess and find its port from the banner."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Iterator

READY = re.compile(r"Server is ready and listening on tcp://[\d.]+:(\d+)")


@contextmanager
def serve_process(*args: str, env: dict | None = None, timeout: float = 60,
                  ready: re.Pattern = READY) -> Iterator[tuple[subprocess.Popen, int]]:
    """Yields (process, port: the first group of the ``ready`` banner line); always terminates the process."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "policyserve", "serve", "--port", "0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})},
    )
    lines = []
    try:
        deadline = time.monotonic() + timeout
        port = None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            match = ready.search(line)
            if match:
                port = int(match.group(1))
                break
        if port is None:
            proc.kill()
            raise RuntimeError("server did not start:\n" + "".join(lines) + (proc.stdout.read() or ""))
        proc.banner = "".join(lines)  # type: ignore[attr-defined]
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
