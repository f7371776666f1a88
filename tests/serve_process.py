"""Start ``policyserve serve`` as a real subprocess and find its port from the banner."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
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
    lines: queue.Queue[str | None] = queue.Queue()

    def read_banner() -> None:  # a thread, so waiting for the banner is bounded even if the server hangs
        for line in proc.stdout:
            lines.put(line)
            if ready.search(line):
                break
        else:
            lines.put(None)

    threading.Thread(target=read_banner, daemon=True).start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + timeout
        port = None
        while port is None:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            seen.append(line)
            match = ready.search(line)
            if match:
                port = int(match.group(1))
        if port is None:
            proc.kill()
            proc.wait(10)
            raise RuntimeError("server did not start:\n" + "".join(seen))
        lines_text = "".join(seen)
        proc.banner = lines_text  # type: ignore[attr-defined]
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
