"""``ModelPolicy``: a trained policyserve checkpoint behind the :class:`BasePolicy` interface."""

from __future__ import annotations

from pathlib import Path
import numpy as np
import torch

from ..errors import ConfigError, ValidationError
from ..policies.base import Action, BasePolicy, Info, Observation
from ..registry import canonical_tag
from ..types import EmbodimentTag, ModalityConfigs, ModalityDims
from .checkpoint import PolicyBundle, load_checkpoint, resolve_device
from .data import language_key, resize_frames
from .network import FlowMatchingPolicyNet


class ModelPolicy(BasePolicy):
    """Serves a :class:`FlowMatchingPolicyNet`; a whole request batch runs as one forward pass.

    Batchable: the server merges requests from different clients into one forward pass, per-request
    seeds included (``seed`` is a row option).

    Images of any size are resized to the trained ``image_size``. Randomness: with
    ``options={"seed": s}`` every batch row starts from the same noise drawn from ``s``, so a row's
    action depends only on its observation and ``s`` (batched == per-sample requests); otherwise a
    policy-level ``seed`` makes the sequence of calls reproducible (re-seeded by :meth:`reset`);
    with neither, torch's global RNG is used.
    """

    batchable = True
    row_options = frozenset({"seed"})

    def __init__(
        self,
        model: FlowMatchingPolicyNet,
        bundle: PolicyBundle,
        *,
        device: str | torch.device = "cpu",
        strict: bool = True,
        seed: int | None = None,
        num_inference_steps: int | None = None,
    ) -> None:
        super().__init__(strict=strict)
        self.device = resolve_device(device) if not isinstance(device, torch.device) else device
        self.model = model.to(self.device).eval()
        self.bundle = bundle
        self.seed = seed
        self.num_inference_steps = num_inference_steps or bundle.model_config.num_inference_steps
        self._generator: torch.Generator | None = None
        self.reset()

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        embodiment_tag: str | EmbodimentTag | None = None,
        device: str | int = "cpu",
        strict: bool = True,
        seed: int | None = None,
    ) -> ModelPolicy:
        """Load a policyserve checkpoint directory; the tag must be one the checkpoint was trained for."""
        dev = resolve_device(device)
        model, bundle = load_checkpoint(path, dev)
        if embodiment_tag is not None and canonical_tag(embodiment_tag) != bundle.embodiment_tag:
            raise ConfigError(
                f"checkpoint {path} was not trained for embodiment {canonical_tag(embodiment_tag)!r}; "
                f"it has: {bundle.embodiment_tag}"
            )
        return cls(model, bundle, device=dev, strict=strict, seed=seed)

    @property
    def embodiment_tag(self) -> str:
        return self.bundle.embodiment_tag

    def get_modality_config(self) -> ModalityConfigs:
        return self.bundle.modality_configs

    def get_modality_dims(self) -> ModalityDims:
        cfg = self.bundle.model_config
        return ModalityDims(state=dict(cfg.state_dims), action=dict(cfg.action_dims))

    def reset(self, options: dict | None = None) -> Info:
        if self.seed is not None:
            self._generator = torch.Generator().manual_seed(int(self.seed))
        return {}

    def _noise(self, batch: int, options: dict | None) -> torch.Tensor:
        cfg = self.bundle.model_config
        shape = (cfg.action_horizon, cfg.action_dim)
        seed = (options or {}).get("seed")
        if seed is None:
            return torch.randn((batch, *shape), generator=self._generator)
        seeds = seed if isinstance(seed, (list, tuple)) else [seed] * batch  # a list: one seed per row (merged)
        if len(seeds) != batch or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool)
                                          for s in seeds):
            raise ValidationError("options", "seed", f"an int, or a list of {batch} ints", repr(seed))
        rows = {s: torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in set(seeds)}
        return torch.stack([rows[s] for s in seeds])

    def _inputs(self, observation: Observation) -> tuple[dict, dict, torch.Tensor, int]:
        cfg = self.bundle.model_config
        video = {}
        for key in cfg.video_keys:
            frames = np.asarray(observation["video"][key])
            b, t = frames.shape[:2]
            resized = resize_frames(frames.reshape(b * t, *frames.shape[2:]), cfg.image_size)
            video[key] = resized.reshape(b, t, 3, cfg.image_size, cfg.image_size).float().div_(255.0)
        state = {
            key: torch.from_numpy(self.bundle.normalizer.normalize("state", key, observation["state"][key]))
            for key in cfg.state_dims
        }
        batch = next(iter(video.values() or state.values())).shape[0]
        lang = language_key(self.bundle.modality_configs)
        texts = observation.get("language", {}).get(lang) if lang else None
        text = self.bundle.tokenizer.encode([item[-1] for item in texts] if texts else [""] * batch)
        return video, state, torch.from_numpy(text), batch

    def _get_action(self, observation: Observation, options: dict | None = None) -> tuple[Action, Info]:
        video, state, text, batch = self._inputs(observation)
        noise = self._noise(batch, options)
        dev = self.device
        with torch.inference_mode():
            chunk = self.model.sample(
                {k: v.to(dev) for k, v in video.items()}, {k: v.to(dev) for k, v in state.items()},
                text.to(dev), noise.to(dev), self.num_inference_steps,
            ).float().cpu().numpy()
        action: Action = {}
        start = 0
        for key, dim in self.bundle.model_config.action_dims.items():
            action[key] = self.bundle.normalizer.unnormalize("action", key, chunk[..., start : start + dim])
            start += dim
        return action, {}

