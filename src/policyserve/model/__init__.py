"""policyserve's trainable visuomotor flow-matching policy (needs the ``model`` extra: torch, safetensors).

This package's ``__init__`` imports no torch; :func:`load_policy` imports it on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..policies.base import BasePolicy
    from ..types import EmbodimentTag

__all__ = ["load_policy", "checkpoint_kind"]


def checkpoint_kind(model_path: str | Path) -> str:
    """"policyserve" or "gr00t", from the checkpoint directory's files; ConfigError otherwise."""
    from .checkpoint import detect_checkpoint_kind

    return detect_checkpoint_kind(model_path)


def load_policy(
    model_path: str | Path,
    *,
    embodiment_tag: str | EmbodimentTag | None = None,
    device: str | int = "cpu",
    strict: bool = True,
    seed: int | None = None,
) -> BasePolicy:
    """Policy for a checkpoint directory: ours (``ModelPolicy``) or GR00T's (``Gr00tAdapterPolicy``).

    ``embodiment_tag=None`` uses the tag a policyserve checkpoint was trained for (GR00T: new_embodiment).
    Raises :class:`policyserve.errors.ConfigError` for a missing/corrupt checkpoint, an embodiment tag the
    checkpoint lacks, a device that does not exist, or a GR00T checkpoint without the gr00t package.
    """
    from .checkpoint import GR00T, detect_checkpoint_kind

    kind = detect_checkpoint_kind(model_path)
    if kind == GR00T:
        from .gr00t_adapter import Gr00tAdapterPolicy

        return Gr00tAdapterPolicy.from_checkpoint(model_path, embodiment_tag=embodiment_tag, device=device,
                                                  strict=strict)
    from .policy import ModelPolicy

    return ModelPolicy.from_checkpoint(model_path, embodiment_tag=embodiment_tag, device=device, strict=strict,
                                       seed=seed)
