"""Architecture and training hyper-parameters of policyserve's visuomotor flow-matching policy."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..types import ModalityConfigs


@dataclass
class ModelConfig:
    """Everything needed to rebuild the network: input/output layout plus architecture sizes.

    ``state_dims`` and ``action_dims`` keep the modality configs' key order; the action chunk the
    network predicts is the concatenation of the action keys in that order.
    """

    video_keys: list[str]
    state_dims: dict[str, int]
    action_dims: dict[str, int]
    video_horizon: int = 1
    state_horizon: int = 1
    action_horizon: int = 16
    image_size: int = 84
    """Square size images are resized to."""
    conv_channels: list[int] = field(default_factory=lambda: [32, 64, 64, 64])
    d_model: int = 128
    """Width of the transformer trunk."""
    n_heads: int = 4
    trunk_layers: int = 2
    head_layers: int = 2
    ff_mult: int = 4
    dropout: float = 0.0
    num_inference_steps: int = 4
    """Denoising steps at inference."""
    text_vocab_size: int = 2
    text_max_len: int = 16
    noise_beta_alpha: float = 1.5
    noise_beta_beta: float = 1.0
    noise_s: float = 0.999
    rtc_max_delay: int = 0
    """Training-time real-time chunking (Black et al. 2025, arXiv 2512.05964): each training chunk's first
    ``d`` actions, ``d`` uniform in 0..rtc_max_delay, are given clean (flow time 1) and left out of the loss, so
    the model learns to continue a committed prefix. At inference an ``rtc`` request's frozen steps (up to this
    many) are then conditioned on exactly instead of guided. 0: trained without it."""

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if not self.action_dims:
            raise ConfigError("the model needs at least one action key")
        for name in ("video_horizon", "state_horizon", "action_horizon", "image_size", "num_inference_steps"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if isinstance(self.rtc_max_delay, bool) or not 0 <= int(self.rtc_max_delay) < int(self.action_horizon):
            raise ConfigError(f"ModelConfig.rtc_max_delay must be from 0 to action_horizon - 1 "
                              f"({int(self.action_horizon) - 1}), got {self.rtc_max_delay!r}")

    @property
    def action_dim(self) -> int:
        """Width of the concatenated action vector."""
        return sum(self.action_dims.values())

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (inverse of :meth:`from_json`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelConfig:
        """Rebuild from :meth:`to_json` output; unknown fields are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"model config has unknown fields {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def from_modality_configs(
        cls,
        configs: ModalityConfigs,
        state_dims: dict[str, int],
        action_dims: dict[str, int],
        **architecture: Any,
    ) -> ModelConfig:
        """Layout from modality configs plus per-key dims (e.g. read from the data)."""
        video = configs.get("video")
        state = configs.get("state")
        missing_state = [k for k in (state.modality_keys if state else []) if k not in state_dims]
        missing_action = [k for k in configs["action"].modality_keys if k not in action_dims]
        if missing_state or missing_action:
            raise ConfigError(f"no dimension known for state keys {missing_state} / action keys {missing_action}")
        return cls(
            video_keys=list(video.modality_keys) if video else [],
            state_dims={k: int(state_dims[k]) for k in (state.modality_keys if state else [])},
            action_dims={k: int(action_dims[k]) for k in configs["action"].modality_keys},
            video_horizon=video.horizon if video else 1,
            state_horizon=state.horizon if state else 1,
            action_horizon=configs["action"].span,
            **architecture,
        )


@dataclass
class TrainConfig:
    """Optimisation settings of ``policyserve train``."""

    max_steps: int = 2000
    """Optimizer steps in all (a resumed run continues up to this count)."""
    batch_size: int = 32
    """Samples per optimizer step."""
    learning_rate: float = 3e-4
    """Peak learning rate (AdamW), reached after ``warmup_steps``, then cosine decay."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    warmup_steps: int = 100
    """Steps of linear learning-rate warm-up."""
    min_lr_ratio: float = 0.05
    """Learning rate at the end of the cosine decay, as a share of ``learning_rate``."""
    grad_clip: float = 1.0
    """Largest gradient norm (clipped above it)."""
    save_steps: int = 500
    """Write a checkpoint-<step> directory every N steps."""
    eval_steps: int | None = None
    """Eval-loss interval in steps (default: ``save_steps``)."""
    eval_batches: int = 4
    """Batches of the eval split averaged for each eval loss."""
    seed: int = 0
    """Seed of the weights, the batch order and the augmentation."""
    device: str = "cpu"
    """Torch device: cpu, cuda or cuda:N."""
    augment: bool = True
    """Random-shift and colour-jitter image augmentation."""
    resume: bool = True
    """Continue from the last checkpoint in the output directory."""
    progress: bool = True
    """Show a progress bar."""
    num_threads: int | None = None
    """Torch CPU threads (default: torch's choice)."""

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "save_steps"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
