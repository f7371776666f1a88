"""Serve a real GR00T N1.6 checkpoint through policyserve when the ``gr00t`` package is installed."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..policies.base import Action, BasePolicy, Info, Observation
from ..registry import canonical_tag
from ..types import EmbodimentTag, ModalityConfig, ModalityConfigs, to_json_serializable

GR00T_POLICY_MODULE = "gr00t.policy.gr00t_policy"
INSTALL_HINT = (
    "install NVIDIA's GR00T package to serve it: git clone https://github.com/NVIDIA/Isaac-GR00T && "
    "pip install -e Isaac-GR00T (GPU and its flash-attn/torch requirements needed), "
    "or train a policyserve model with `policyserve train`"
)


def import_gr00t_policy_class() -> type:
    """``gr00t.policy.gr00t_policy.Gr00tPolicy``; ConfigError with install instructions when missing."""
    try:
        module = importlib.import_module(GR00T_POLICY_MODULE)
    except ImportError as exc:
        raise ConfigError(f"this is a GR00T checkpoint but the gr00t package is not importable ({exc}); "
                          f"{INSTALL_HINT}") from exc
    try:
        return module.Gr00tPolicy
    except AttributeError as exc:
        raise ConfigError(f"{GR00T_POLICY_MODULE} has no Gr00tPolicy (a GR00T release before N1.6?); "
                          f"{INSTALL_HINT}") from exc


def _gr00t_tag(tag: str | EmbodimentTag | None) -> Any:
    """GR00T's own EmbodimentTag member for ``tag`` (by value or name)."""
    enum = importlib.import_module("gr00t.data.embodiment_tags").EmbodimentTag
    wanted = canonical_tag(tag or EmbodimentTag.NEW_EMBODIMENT)
    for member in enum:
        if wanted in (str(member.value).lower(), member.name.lower()):
            return member
    raise ConfigError(f"gr00t does not know embodiment tag {wanted!r}; known: {', '.join(m.value for m in enum)}")


class Gr00tAdapterPolicy(BasePolicy):
    """Wraps ``Gr00tPolicy`` so our server (timeouts, auth, batching) serves it; gr00t validates too.

    Batchable: ``Gr00tPolicy.get_action`` treats batch rows independently, so requests from different
    clients are merged into one call.
    """

    batchable = True

    def __init__(self, policy: Any, *, strict: bool = True) -> None:
        super().__init__(strict=strict)
        self.policy = policy
        self._configs = {
            modality: config if isinstance(config, ModalityConfig) else ModalityConfig.from_json(
                to_json_serializable(config))
            for modality, config in policy.get_modality_config().items()
        }

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, *, embodiment_tag: str | EmbodimentTag | None = None, device: str | int = "cuda",
        strict: bool = True,
    ) -> Gr00tAdapterPolicy:
        """Load a GR00T checkpoint with ``Gr00tPolicy`` (needs the gr00t package)."""
        policy_cls = import_gr00t_policy_class()
        tag = _gr00t_tag(embodiment_tag)
        try:
            policy = policy_cls(embodiment_tag=tag, model_path=str(path), device=device, strict=strict)
        except KeyError as exc:
            raise ConfigError(f"GR00T checkpoint {path} was not trained for embodiment {tag.value!r} "
                              f"(missing {exc}); pass the tag it was fine-tuned with") from exc
        return cls(policy, strict=strict)

    def get_modality_config(self) -> ModalityConfigs:
        return self._configs

    def _get_action(self, observation: Observation, options: dict | None = None) -> tuple[Action, Info]:
        return self.policy.get_action(observation, options)

    def reset(self, options: dict | None = None) -> Info:
        return self.policy.reset(options)
