"""Flat GR00T sim-env format (``video.<k>``, ``state.<k>``, language key) <-> nested policy format."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ValidationError
from . import validation
from .base import Action, BasePolicy, Info, Observation, PolicyWrapper


class SimPolicyWrapper(PolicyWrapper):
    """GR00T's ``Gr00tSimPolicyWrapper``: flat observations in, ``action.<k>`` actions out.

    Input: ``video.<k>`` uint8 (B,T,H,W,3), ``state.<k>`` float32 (B,T,D), and the language under its
    bare modality key as a list/tuple of B strings. Output: every action key ``k`` as ``action.<k>``.
    """

    def __init__(self, policy: BasePolicy, *, strict: bool = True) -> None:
        super().__init__(policy, strict=strict)
        language = policy.get_modality_config()["language"]
        if language.horizon != 1:
            raise ValueError(f"SimPolicyWrapper needs one language delta index, got {language.delta_indices}")

    def to_nested(self, observation: dict[str, Any]) -> Observation:
        configs = self.get_modality_config()
        nested: Observation = {"video": {}, "state": {}, "language": {}}
        for modality in ("video", "state"):
            for key in configs[modality].modality_keys:
                flat_key = f"{modality}.{key}"
                if flat_key not in observation:
                    raise ValidationError(flat_key, None, "key present in the flat observation",
                                          f"keys {sorted(observation)}", "missing")
                nested[modality][key] = observation[flat_key]
        for key in configs["language"].modality_keys:
            if key not in observation:
                raise ValidationError(key, None, "language key present in the flat observation",
                                      f"keys {sorted(observation)}", "missing")
            texts = observation[key]
            if isinstance(texts, str):
                texts = [texts]
            nested["language"][key] = [[str(t)] for t in texts]
        return nested

    def check_observation(self, observation: Observation) -> int:
        if not isinstance(observation, dict):
            raise ValidationError("observation", None, "a flat dict of video.<k>/state.<k>/language",
                                  type(observation).__name__)
        return validation.check_observation(self.to_nested(observation), self.get_modality_config(),
                                            self.get_modality_dims())

    def check_action(self, action: Action, batch_size: int | None = None) -> int:
        if not isinstance(action, dict):
            raise ValidationError("action", None, "a dict of action.<k> arrays", type(action).__name__)
        nested = {k[len("action."):]: v for k, v in action.items() if k.startswith("action.")}
        return validation.check_action(nested, self.get_modality_config(), self.get_modality_dims(), batch_size)

    def _get_action(self, observation: Observation, options: dict | None = None) -> tuple[Action, Info]:
        action, info = self.policy.get_action(self.to_nested(observation), options)
        return {f"action.{k}": np.asarray(v) for k, v in action.items()}, info


Gr00tSimPolicyWrapper = SimPolicyWrapper
