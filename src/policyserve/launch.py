"""``policyserve serve`` as a managed subprocess (for the demo workflow and benchmarks)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .client.connect import ServerUnavailableError
from .client.policy_client import PolicyClient


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for servers started as subprocesses)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """``python -m policyserve serve ARGS --port PORT`` as a child process, stopped by :meth:`stop`.

    :meth:`start` returns once the server answers a ping (bounded by ``startup_timeout_s``) and raises
    :class:`ServerUnavailableError` with the tail of the server's log if it exits or never answers.
    """

    def __init__(self, args: Sequence[str], *, name: str = "server", host: str = "127.0.0.1",
                 port: int | None = None, log_path: str | Path | None = None, api_token: str | None = None,
                 startup_timeout_s: float = 60.0) -> None:
        self.args, self.name, self.host = list(args), name, host
        self.port = port or free_port(host)
        self.log_path = Path(log_path) if log_path else None
        self.api_token = api_token
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "policyserve", "serve", *self.args, "--host", self.host, "--port", str(self.port)]

    def start(self) -> ServerProcess:
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ)
        if self.api_token:
            env["POLICYSERVE_API_TOKEN"] = self.api_token
        self.process = subprocess.Popen(self.command, stdout=self._log or subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout_s
        client = PolicyClient(self.host, self.port, timeout_ms=500, api_token=self.api_token)
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise ServerUnavailableError(f"{self.name} exited with code {self.process.returncode} "
                                                 f"during startup:\n{self.log_tail()}")
                if client.ping():
                    return self
            raise ServerUnavailableError(f"{self.name} did not answer within {self.startup_timeout_s:.0f} s:\n"
                                         f"{self.log_tail()}")
        except BaseException:
            self.stop()
            raise
        finally:
            client.close()

    def log_tail(self, lines: int = 20) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return "(no log)"
        if self._log is not None:
            self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the server (its process group), SIGKILL after ``timeout_s``; idempotent."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout_s)
            except ProcessLookupError:
                pass
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
