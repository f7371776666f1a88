"""Small builders shared by the core tests."""

from __future__ import annotations

import time

import numpy as np

from policyserve.policies.base import BasePolicy
from policyserve.protocol.client import PolicyClient
from policyserve.protocol.server import PolicyServer
from policyserve.registry import get_embodiment_spec
from policyserve.types import ModalityConfig

LANG_KEY = "annotation.human.action.task_description"


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
