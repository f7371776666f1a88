"""Small builders shared by the core tests."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import zmq

from policyserve import ConstantPolicy
from policyserve.policies.base import BasePolicy
from policyserve.client.policy_client import PolicyClient
from policyserve.wire.gr00t import packb, unpackb
from policyserve.serving.server import PolicyServer
from policyserve.registry import get_embodiment_spec
from policyserve.types import ModalityConfig

LANG_KEY = "annotation.human.action.task_description"
SPEC = get_embodiment_spec("franka_panda")


def franka_observation(batch: int = 1, size: int = 32, state_dim_override: dict | None = None) -> dict:
    """A valid nested observation for the built-in ``franka_panda`` modality config."""
    spec = get_embodiment_spec("franka_panda")
    dims = {**spec.dims.state, **(state_dim_override or {})}
    rng = np.random.default_rng(0)
    return {
        "video": {k: rng.integers(0, 255, (batch, 1, size, size, 3), dtype=np.uint8)
                  for k in spec.modality_configs["video"].modality_keys},
        "state": {k: rng.standard_normal((batch, 1, d)).astype(np.float32) for k, d in dims.items()},
        "language": {LANG_KEY: [["lift the cube"]] * batch},
    }


class StepIndexPolicy(BasePolicy):
    """Action row h of env b = [observed step + h, h] (after ``latency_s``): executed actions reveal chunk positions.

    Observes ``state.step`` and language ``task``; records every reset's options in ``resets``.
    """

    def __init__(self, horizon: int, latency_s: float = 0.0) -> None:
        super().__init__(strict=True)
        self.horizon, self.latency_s = horizon, latency_s
        self.resets: list[dict] = []

    def get_modality_config(self):
        return {
            "video": ModalityConfig([0], []),
            "state": ModalityConfig([0], ["step"]),
            "action": ModalityConfig(list(range(self.horizon)), ["a"]),
            "language": ModalityConfig([0], ["task"]),
        }

    def reset(self, options=None):
        self.resets.append(options)
        return {}

    def _get_action(self, observation, options=None):
        time.sleep(self.latency_s)
        step = observation["state"]["step"][:, -1, 0]
        h = np.arange(self.horizon, dtype=np.float32)
        a = np.stack([step[:, None] + h, np.broadcast_to(h, (len(step), self.horizon))], axis=-1)
        return {"a": a.astype(np.float32)}, {}


class Served:
    """A policy served in-process on a free loopback port, with a client; closed by ``close``."""

    def __init__(self, policy: BasePolicy, timeout_ms: int = 20000) -> None:
        self.server = PolicyServer(policy, port=0, verbose=False)
        self.port = self.server.start()
        self.client = PolicyClient("127.0.0.1", self.port, timeout_ms=timeout_ms)

    def close(self) -> None:
        self.client.close()
        self.server.stop()


class SlowPolicy(ConstantPolicy):
    """A batchable policy costing ``delay`` s per call that echoes ``state.eef_pos[..., 0]`` into the arm
    action (so splitting merged replies is checked) and logs its calls."""

    def __init__(self, delay: float = 0.02, batchable: bool = True) -> None:
        super().__init__(SPEC.modality_configs, SPEC.dims)
        self.delay = delay
        self.batchable = batchable
        self.log: list[tuple[str, float, int]] = []  # (what, perf_counter at start, rows)
        self.lock = threading.Lock()

    def _get_action(self, observation, options=None):
        rows = observation["state"]["eef_pos"].shape[0]
        with self.lock:
            self.log.append(("get_action", time.perf_counter(), rows))
        time.sleep(self.delay)
        action, info = super()._get_action(observation, options)
        action["arm"][:] = observation["state"]["eef_pos"][:, -1:, :1]
        return action, info

    def reset(self, options=None):
        with self.lock:
            self.log.append(("reset", time.perf_counter(), 0))
        return {"reset": True}


LONG_CALL_MARK = 99.0
"""An ``eef_pos`` value (see :func:`marked_observation`) that makes :class:`LongCallPolicy` take its long delay."""


class LongCallPolicy(SlowPolicy):
    """A :class:`SlowPolicy` whose calls with a row marked :data:`LONG_CALL_MARK` take ``long_delay`` s more,
    during which a file in ``marker_dir`` holds the name of the Ray Serve replica making the call (so a test can
    kill a replica known to be mid-call)."""

    def __init__(self, delay: float, marker_dir: str, long_delay: float = 5.0) -> None:
        super().__init__(delay)
        self.marker_dir = marker_dir
        self.long_delay = long_delay

    def _get_action(self, observation, options=None):
        if np.any(observation["state"]["eef_pos"] == LONG_CALL_MARK):
            from ray import serve

            marker = os.path.join(self.marker_dir, f"{os.getpid()}-{time.monotonic_ns()}")
            with open(marker + ".tmp", "w") as f:
                f.write(serve.get_replica_context().replica_id.to_full_id_str())
            os.replace(marker + ".tmp", marker)  # a reader never sees a half-written name
            time.sleep(self.long_delay)
        return super()._get_action(observation, options)


def marked_observation(value: float, batch: int = 1) -> dict:
    obs = franka_observation(batch=batch)
    obs["state"]["eef_pos"][:] = value
    return obs


class Dealer:
    """A pipelining DEALER client speaking the GR00T wire format (one msgpack frame per request)."""

    def __init__(self, port: int) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(f"tcp://127.0.0.1:{port}")

    def send(self, endpoint: str, data: dict | None = None, frames: list[bytes] | None = None) -> None:
        body = packb({"endpoint": endpoint, "data": data})
        self.sock.send_multipart([*(frames or []), body])

    def recv(self, timeout_ms: int = 10000) -> object:
        if not self.sock.poll(timeout_ms):
            raise TimeoutError(f"no reply within {timeout_ms} ms")
        return unpackb(self.sock.recv_multipart()[-1])

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def concurrently(calls: list, timeout: float = 20.0) -> list:
    """Run the calls on threads at once; their results in order (exceptions re-raised)."""
    results: list = [None] * len(calls)
    errors: list = []

    def run(i, call):
        try:
            results[i] = call()
        except Exception as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a call did not finish in time"
    if errors:
        raise errors[0]
    return results


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def default_sigint() -> None:
    """``preexec_fn`` for a child that a test interrupts with SIGINT: Ctrl-C's default action, also when the
    test runs in a background job (a non-interactive shell starts those with SIGINT ignored, which Python
    children inherit: they would never see the KeyboardInterrupt)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
