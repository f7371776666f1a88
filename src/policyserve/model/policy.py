"""``ModelPolicy``: a trained policyserve checkpoint behind the :class:`BasePolicy` interface."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, ValidationError
from ..policies.base import Action, BasePolicy, Info, Observation
from ..registry import canonical_tag
from ..types import EmbodimentTag, ModalityConfigs, ModalityDims
from .checkpoint import PolicyBundle, load_checkpoint, resolve_device
from .data import language_key, resize_frames
from .network import FlowMatchingPolicyNet
from .rtc import RTC_OPTION, Guidance, RTCRequest, build_guidance


class ModelPolicy(BasePolicy):
    """Serves a :class:`FlowMatchingPolicyNet`; a whole request batch runs as one forward pass.

    Batchable: the server merges requests from different clients into one forward pass, per-request
    seeds and RTC prefixes included (``seed`` and ``rtc`` are row options).

    Real-time chunking: ``options={"rtc": {"prefix": {action_key: (B, P, D)}, "inference_delay": d,
    "execution_horizon": s}}`` makes the chunk an inpainting of the committed prefix (see
    :mod:`policyserve.model.rtc`); rows without ``rtc`` in the same call are sampled as usual.

    Images of any size are resized to the trained ``image_size``. Randomness: with
    ``options={"seed": s}`` every batch row starts from the same noise drawn from ``s``, so a row's
    action depends only on its observation and ``s`` (batched == per-sample requests); otherwise a
    policy-level ``seed`` makes the sequence of calls reproducible (re-seeded by :meth:`reset`);
    with neither, torch's global RNG is used.
    """

    batchable = True
    row_options = frozenset({"seed", RTC_OPTION})
    capabilities = frozenset({RTC_OPTION})

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
        """Restart the unseeded noise stream (with a policy seed); the info declares ``image_size``, the (H, W)
        every camera is resized to, and ``camera_sizes``, each camera's (H, W) in the training data when the
        checkpoint records them (clients warn when their cameras differ from those)."""
        if self.seed is not None:
            self._generator = torch.Generator().manual_seed(int(self.seed))
        size = int(self.bundle.model_config.image_size)
        info: Info = {"image_size": [size, size]}
        cameras = self.bundle.training.get("camera_sizes")
        if isinstance(cameras, dict) and cameras:
            info["camera_sizes"] = {str(k): [int(v) for v in hw] for k, hw in cameras.items()}
        return info

    def check_options(self, options: dict | None, batch_size: int | None = None) -> None:
        """Also checks ``options["rtc"]`` (a map, or one value per row in a merged call) against the action keys."""
        value = (options or {}).get(RTC_OPTION)
        if isinstance(value, list):
            if batch_size is not None and len(value) != batch_size:
                raise ValidationError("options", RTC_OPTION, f"one value per batch row ({batch_size})",
                                      f"a list of {len(value)}")
            for row in value:
                if row is not None and not isinstance(row, RTCRequest):
                    self._rtc(row, None)
        elif value is not None:
            self._rtc(value, batch_size)

    def split_row_option(self, key: str, value: Any, rows: int) -> list[Any]:
        if key != RTC_OPTION or isinstance(value, RTCRequest):
            return [value] * rows
        request = self._rtc(value, rows)
        return [request.row(i) for i in range(rows)]

    def _rtc(self, value: Any, batch: int | None) -> RTCRequest:
        cfg = self.bundle.model_config
        return RTCRequest.parse(value, cfg.action_dims, cfg.action_horizon, batch)

    def _guidance(self, batch: int, options: dict | None) -> Guidance | None:
        value = (options or {}).get(RTC_OPTION)
        if value is None:
            return None
        rows = value if isinstance(value, list) else self.split_row_option(RTC_OPTION, value, batch)
        if len(rows) != batch:
            raise ValidationError("options", RTC_OPTION, f"one value per batch row ({batch})", f"{len(rows)} values")
        rows = [row if row is None or isinstance(row, RTCRequest) else self._rtc(row, 1).row(0) for row in rows]
        normalizer = self.bundle.normalizer
        cfg = self.bundle.model_config
        return build_guidance(rows, cfg.action_horizon, lambda k, a: normalizer.normalize("action", k, a),
                              cfg.action_dims, cfg.rtc_max_delay)

    def _noise(self, batch: int, options: dict | None) -> torch.Tensor:
        cfg = self.bundle.model_config
        shape = (cfg.action_horizon, cfg.action_dim)
        seed = (options or {}).get("seed")
        if seed is None:
            return torch.randn((batch, *shape), generator=self._generator)
        seeds = seed if isinstance(seed, (list, tuple)) else [seed] * batch  # a list: one seed per row (merged)
        if len(seeds) != batch or not all(s is None or (isinstance(s, (int, np.integer)) and not isinstance(s, bool))
                                          for s in seeds):
            raise ValidationError("options", "seed", f"an int, or a list of {batch} ints", repr(seed))
        unseeded = [i for i, s in enumerate(seeds) if s is None]  # merged rows of requests without a seed
        drawn = iter(torch.randn((len(unseeded), *shape), generator=self._generator) if unseeded else [])
        rows = {s: torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in set(seeds) - {None}}
        return torch.stack([next(drawn) if s is None else rows[s] for s in seeds])

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
        guidance = self._guidance(batch, options)
        dev = self.device
        # Guidance differentiates through the network, which inference mode forbids.
        with torch.inference_mode() if guidance is None else torch.no_grad():
            chunk = self.model.sample(
                {k: v.to(dev) for k, v in video.items()}, {k: v.to(dev) for k, v in state.items()},
                text.to(dev), noise.to(dev), self.num_inference_steps,
                guidance=None if guidance is None else guidance.to(dev),
            ).float().cpu().numpy()
        action: Action = {}
        start = 0
        for key, dim in self.bundle.model_config.action_dims.items():
            action[key] = self.bundle.normalizer.unnormalize("action", key, chunk[..., start : start + dim])
            start += dim
        return action, {}

