"""Episodes -> training batches: frames decoded and resized once into a cache, indices per sample, augmentation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..types import ModalityConfigs
from .normalization import Normalizer
from .text import TextTokenizer


class EpisodeLike(Protocol):
    """What the pipeline reads from an episode (``policyserve.data.lerobot.Episode`` or a test double)."""

    episode_index: int
    length: int
    states: dict[str, np.ndarray]
    actions: dict[str, np.ndarray]
    language: dict[str, list[str]]
    videos: dict[str, np.ndarray]


def resize_frames(frames: np.ndarray | Tensor, size: int, chunk: int = 256) -> Tensor:
    """uint8 (N, H, W, 3) -> uint8 (N, 3, size, size), bilinear with antialiasing."""
    if isinstance(frames, np.ndarray) and not frames.flags.writeable:  # e.g. decoded from a request
        frames = frames.copy()
    frames = torch.as_tensor(frames)
    out = torch.empty((frames.shape[0], 3, size, size), dtype=torch.uint8)
    for start in range(0, frames.shape[0], chunk):
        part = frames[start : start + chunk].permute(0, 3, 1, 2)
        if part.shape[-2:] != (size, size):
            part = F.interpolate(part.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            part = part.round().clamp(0, 255)
        out[start : start + chunk] = part.to(torch.uint8)
    return out


def augment_images(images: Tensor, pad: int = 4, jitter: float = 0.2) -> Tensor:
    """Random shift (pad + random crop) and brightness/contrast jitter of float images (N, T, 3, S, S) in [0, 1].

    One crop and one colour change per image sequence, shared across its T frames; uses torch's global RNG.
    """
    n, t, c, h, w = images.shape
    padded = F.pad(images.reshape(n, t * c, h, w), (pad, pad, pad, pad), mode="replicate")
    offsets = torch.randint(0, 2 * pad + 1, (n, 2))
    out = torch.stack([padded[i, :, y : y + h, x : x + w] for i, (y, x) in enumerate(offsets.tolist())])
    out = out.reshape(n, t, c, h, w)
    brightness = 1.0 + (torch.rand(n, 1, 1, 1, 1) * 2 - 1) * jitter
    contrast = 1.0 + (torch.rand(n, 1, 1, 1, 1) * 2 - 1) * jitter
    mean = out.mean(dim=(2, 3, 4), keepdim=True)
    return ((out - mean) * contrast + mean * brightness).clamp(0.0, 1.0)


def chunk_offsets(delta_indices: Sequence[int]) -> np.ndarray:
    """Contiguous time offsets of an action chunk: ``delta_indices[0] .. delta_indices[-1]``."""
    return np.arange(delta_indices[0], delta_indices[-1] + 1)


def stack_key(episodes: Sequence[EpisodeLike], group: str, key: str) -> np.ndarray:
    """All episodes' ``group`` ("states"/"actions") arrays for ``key`` concatenated to (N, D) float32."""
    try:
        return np.concatenate([np.asarray(getattr(ep, group)[key], dtype=np.float32).reshape(ep.length, -1)
                               for ep in episodes])
    except KeyError:
        have = sorted(getattr(episodes[0], group))
        raise ConfigError(f"episodes have no {group[:-1]} key {key!r} (have {have})") from None


def language_key(configs: ModalityConfigs) -> str | None:
    """The language key the model reads (first of the language config), if any."""
    lang = configs.get("language")
    return lang.modality_keys[0] if lang is not None and lang.modality_keys else None


def fit_normalizer(episodes: Sequence[EpisodeLike], configs: ModalityConfigs) -> Normalizer:
    """Min-max statistics (mean/std for the configs' ``mean_std_embedding_keys``) over all episodes."""
    arrays = {
        "state": {k: stack_key(episodes, "states", k) for k in configs["state"].modality_keys},
        "action": {k: stack_key(episodes, "actions", k) for k in configs["action"].modality_keys},
    }
    mean_std = {m: configs[m].mean_std_embedding_keys for m in ("state", "action")}
    return Normalizer.fit(arrays, mean_std)


def build_tokenizer(episodes: Sequence[EpisodeLike], configs: ModalityConfigs, max_len: int = 16) -> TextTokenizer:
    """Vocabulary over every task text of the episodes."""
    key = language_key(configs)
    texts = {t for ep in episodes for t in (ep.language.get(key, []) if key else [])}
    return TextTokenizer.build(texts, max_len)


@dataclass
class Batch:
    """Model inputs and normalized target chunk of one training batch."""

    video: dict[str, Tensor]
    state: dict[str, Tensor]
    text: Tensor
    actions: Tensor

    def to(self, device: torch.device) -> Batch:
        return Batch({k: v.to(device) for k, v in self.video.items()},
                     {k: v.to(device) for k, v in self.state.items()}, self.text.to(device), self.actions.to(device))


class TrainingData:
    """Every time step of every episode as a sample, with frames resized once into a uint8 cache."""

    def __init__(
        self,
        episodes: Sequence[EpisodeLike],
        configs: ModalityConfigs,
        normalizer: Normalizer,
        tokenizer: TextTokenizer,
        image_size: int,
    ):
        if not episodes:
            raise ConfigError("no episodes to train on")
        self.configs = configs
        self.video_keys = list(configs["video"].modality_keys) if "video" in configs else []
        self.state_keys = list(configs["state"].modality_keys)
        self.action_keys = list(configs["action"].modality_keys)
        lengths = np.array([int(ep.length) for ep in episodes])
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        self.ep_start = np.repeat(starts, lengths)
        self.ep_len = np.repeat(lengths, lengths)
        self.local_t = np.concatenate([np.arange(n) for n in lengths])
        self.frames: dict[str, Tensor] = {}
        for key in self.video_keys:
            missing = [ep.episode_index for ep in episodes if key not in ep.videos]
            if missing:
                raise ConfigError(f"episodes {missing[:5]} have no video {key!r}")
            self.frames[key] = torch.cat([resize_frames(ep.videos[key], image_size) for ep in episodes])
        self.states = {k: torch.from_numpy(normalizer.normalize("state", k, stack_key(episodes, "states", k)))
                       for k in self.state_keys}
        self.actions = torch.from_numpy(np.concatenate(
            [normalizer.normalize("action", k, stack_key(episodes, "actions", k)) for k in self.action_keys], axis=1))
        lang = language_key(configs)
        texts = [t for ep in episodes for t in (ep.language[lang] if lang else [""] * ep.length)]
        self.text = torch.from_numpy(tokenizer.encode(texts))
        self.video_offsets = np.asarray(configs["video"].delta_indices) if self.video_keys else np.zeros(1, int)
        self.state_offsets = np.asarray(configs["state"].delta_indices)
        self.action_offsets = chunk_offsets(configs["action"].delta_indices)

    def __len__(self) -> int:
        return len(self.local_t)

    def _rows(self, idx: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Global frame rows for samples ``idx`` at ``offsets``, clamped to each episode (edge padding)."""
        t = np.clip(self.local_t[idx, None] + offsets[None, :], 0, self.ep_len[idx, None] - 1)
        return self.ep_start[idx, None] + t

    def batch(self, idx: np.ndarray, augment: bool = False) -> Batch:
        """Samples ``idx`` as a :class:`Batch` (augmentation draws from torch's global RNG)."""
        idx = np.asarray(idx)
        video = {}
        for key in self.video_keys:
            images = self.frames[key][torch.from_numpy(self._rows(idx, self.video_offsets))].float() / 255.0
            video[key] = augment_images(images) if augment else images
        state_rows = torch.from_numpy(self._rows(idx, self.state_offsets))
        state = {k: v[state_rows] for k, v in self.states.items()}
        actions = self.actions[torch.from_numpy(self._rows(idx, self.action_offsets))]
        return Batch(video, state, self.text[torch.from_numpy(idx)], actions)


def describe(data: TrainingData) -> dict[str, Any]:
    """Sizes of a :class:`TrainingData` for logs."""
    return {"samples": len(data), "cameras": data.video_keys, "cache_mb": round(
        sum(f.numel() for f in data.frames.values()) / 2**20, 1)}
