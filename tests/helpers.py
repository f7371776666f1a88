"""Small builders shared by the core tests."""

from __future__ import annotations

import numpy as np

from policyserve.registry import get_embodiment_spec

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
