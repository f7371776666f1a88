"""Training loop: AdamW with warmup + cosine decay, checkpoint-<step>/ directories, resume, eval loss, loss PNG."""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..registry import canonical_tag
from ..types import EmbodimentTag, ModalityConfigs
from .checkpoint import PolicyBundle, read_bundle, resolve_device, save_checkpoint
from .config import ModelConfig, TrainConfig
from .data import EpisodeLike, TrainingData, build_tokenizer, describe, fit_normalizer
from .network import FlowMatchingPolicyNet

log = logging.getLogger(__name__)

TRAINER_STATE_FILE = "trainer_state.json"
TRAINING_STATE_FILE = "training_state.pt"
LOSS_PLOT_FILE = "loss_curve.png"
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainResult:
    """Where the model went and how the losses evolved (``(step, loss)`` pairs)."""

    output_dir: Path
    steps: int
    train_losses: list[tuple[int, float]] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    resumed_from: Path | None = None
    steps_per_second: float = 0.0


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warmup to 1, then cosine decay to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The ``checkpoint-<step>`` directory with the highest step that holds a complete training state."""
    best: tuple[int, Path] | None = None
    for path in Path(output_dir).glob("checkpoint-*"):
        match = _CHECKPOINT_DIR.match(path.name)
        if match and (path / TRAINER_STATE_FILE).is_file() and (path / TRAINING_STATE_FILE).is_file():
            step = int(match.group(1))
            if best is None or step > best[0]:
                best = (step, path)
    return best[1] if best else None


def _dims(episodes: Sequence[EpisodeLike], group: str, keys: list[str]) -> dict[str, int]:
    sample = episodes[0]
    missing = [k for k in keys if k not in getattr(sample, group)]
    if missing:
        raise ConfigError(f"episodes have no {group[:-1]} keys {missing} (have {sorted(getattr(sample, group))})")
    return {k: int(np.asarray(getattr(sample, group)[k]).reshape(sample.length, -1).shape[1]) for k in keys}


def build_bundle(
    episodes: Sequence[EpisodeLike],
    configs: ModalityConfigs,
    architecture: dict[str, Any] | None = None,
    embodiment_tag: str | EmbodimentTag = EmbodimentTag.NEW_EMBODIMENT,
) -> PolicyBundle:
    """Fresh model config, normalization statistics and tokenizer fitted on ``episodes``."""
    architecture = dict(architecture or {})
    tokenizer = build_tokenizer(episodes, configs, architecture.get("text_max_len", 16))
    model_config = ModelConfig.from_modality_configs(
        configs,
        _dims(episodes, "states", configs["state"].modality_keys),
        _dims(episodes, "actions", configs["action"].modality_keys),
        **{"text_vocab_size": len(tokenizer), **architecture},
    )
    normalizer = fit_normalizer(episodes, configs)
    return PolicyBundle(model_config, configs, normalizer, tokenizer, canonical_tag(embodiment_tag))


def _plot_losses(path: Path, train: list[tuple[int, float]], evals: list[tuple[int, float]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the eval extra is optional for training
        log.warning("matplotlib not installed; skipping %s", path)
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        steps, losses = zip(*train)
        window = max(1, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps, losses, alpha=0.3, label="train (per step)")
        ax.plot(steps[window - 1 :], smooth, label=f"train (mean of {window})")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class Trainer:
    """Owns model, optimizer, schedule and data of one training run in ``output_dir``."""

    def __init__(
        self,
        train_episodes: Sequence[EpisodeLike],
        configs: ModalityConfigs,
        output_dir: str | Path,
        config: TrainConfig,
        *,
        eval_episodes: Sequence[EpisodeLike] | None = None,
        architecture: dict[str, Any] | None = None,
        embodiment_tag: str | EmbodimentTag = EmbodimentTag.NEW_EMBODIMENT,
        training_info: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.output_dir = Path(output_dir)
        self.device = resolve_device(config.device)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.resumed_from = latest_checkpoint(self.output_dir) if config.resume else None
        fresh = build_bundle(train_episodes, configs, architecture, embodiment_tag)
        if self.resumed_from is not None:
            self.bundle = read_bundle(self.resumed_from)
            if self.bundle.model_config != fresh.model_config:
                raise ConfigError(
                    f"{self.resumed_from} was trained with a different model config; "
                    "set resume=False or use another output_dir"
                )
        else:
            self.bundle = fresh
        self.bundle.training = {**(training_info or {}), "seed": config.seed, "batch_size": config.batch_size,
                                "max_steps": config.max_steps, "learning_rate": config.learning_rate,
                                "camera_sizes": camera_sizes(train_episodes)}
        image_size = self.bundle.model_config.image_size
        args = (self.bundle.normalizer, self.bundle.tokenizer, image_size)
        self.train_data = TrainingData(train_episodes, configs, *args)
        self.eval_data = TrainingData(eval_episodes, configs, *args) if eval_episodes else None
        log.info("train data: %s", describe(self.train_data))
        torch.manual_seed(config.seed)
        self.rng = np.random.default_rng(config.seed)
        self.model = FlowMatchingPolicyNet(self.bundle.model_config).to(self.device)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
        )
        warmup = min(config.warmup_steps, max(1, config.max_steps // 10))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, warmup, config.max_steps, config.min_lr_ratio)
        )
        self.step = 0
        self.train_losses: list[tuple[int, float]] = []
        self.eval_losses: list[tuple[int, float]] = []
        if self.resumed_from is not None:
            self._load_state(self.resumed_from)

    def _load_state(self, path: Path) -> None:
        from safetensors.torch import load_file

        self.model.load_state_dict(load_file(str(path / "model.safetensors")))
        state = torch.load(path / TRAINING_STATE_FILE, map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        self.rng.bit_generator.state = state["numpy_rng"]
        trainer_state = json.loads((path / TRAINER_STATE_FILE).read_text())
        self.step = int(trainer_state["step"])
        self.train_losses = [tuple(x) for x in trainer_state["train_losses"]]
        self.eval_losses = [tuple(x) for x in trainer_state["eval_losses"]]
        # on stderr, so that the CLI's JSON summary on stdout stays parseable
        print(f"Resuming from {path.name} (step {self.step}) in {path.parent}", file=sys.stderr, flush=True)

    def _trainer_state(self) -> dict[str, Any]:
        return {"step": self.step, "train_losses": self.train_losses, "eval_losses": self.eval_losses}

    def save(self, directory: Path, with_training_state: bool = True) -> Path:
        """Loadable checkpoint in ``directory`` (plus optimizer/RNG state for resuming)."""
        self.bundle.training["steps"] = self.step
        save_checkpoint(directory, self.model, self.bundle)
        (directory / TRAINER_STATE_FILE).write_text(json.dumps(self._trainer_state()))
        if with_training_state:
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "torch_rng": torch.get_rng_state(), "numpy_rng": self.rng.bit_generator.state},
                       directory / TRAINING_STATE_FILE)
        return directory

    def train_step(self) -> float:
        """One optimisation step on a random batch; returns its loss."""
        self.model.train()
        idx = self.rng.integers(0, len(self.train_data), self.config.batch_size)
        batch = self.train_data.batch(idx, augment=self.config.augment).to(self.device)
        loss = self.model.loss(batch.video, batch.state, batch.text, batch.actions)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self, data: TrainingData | None = None, batches: int | None = None, seed: int = 1234) -> float:
        """Mean flow-matching loss on fixed batches of ``data`` (eval split by default), with fixed noise."""
        data = data or self.eval_data
        if data is None:
            return float("nan")
        self.model.eval()
        rng = np.random.default_rng(seed)
        losses = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for _ in range(batches or self.config.eval_batches):
                idx = rng.integers(0, len(data), min(self.config.batch_size, len(data)))
                batch = data.batch(idx).to(self.device)
                losses.append(float(self.model.loss(batch.video, batch.state, batch.text, batch.actions)))
        return float(np.mean(losses))

    def run(self) -> TrainResult:
        """Train to ``max_steps``, saving checkpoint-<step>/ every ``save_steps`` and the final model in output_dir."""
        from tqdm.auto import tqdm

        cfg = self.config
        eval_every = cfg.eval_steps or cfg.save_steps
        start_step, start_time = self.step, time.perf_counter()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with tqdm(total=cfg.max_steps, initial=self.step, desc="train", disable=not cfg.progress) as bar:
            while self.step < cfg.max_steps:
                loss = self.train_step()
                self.train_losses.append((self.step, loss))
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
                if self.eval_data is not None and (self.step % eval_every == 0 or self.step == cfg.max_steps):
                    self.eval_losses.append((self.step, self.evaluate()))
                    bar.set_postfix(loss=f"{loss:.4f}", eval=f"{self.eval_losses[-1][1]:.4f}")
                if self.step % cfg.save_steps == 0 or self.step == cfg.max_steps:
                    self.save(self.output_dir / f"checkpoint-{self.step}")
        elapsed = time.perf_counter() - start_time
        self.save(self.output_dir, with_training_state=False)
        _plot_losses(self.output_dir / LOSS_PLOT_FILE, self.train_losses, self.eval_losses)
        return TrainResult(self.output_dir, self.step, self.train_losses, self.eval_losses, self.resumed_from,
                           (self.step - start_step) / elapsed if elapsed > 0 and self.step > start_step else 0.0)


def train_policy(
    train_episodes: Sequence[EpisodeLike],
    configs: ModalityConfigs,
    output_dir: str | Path,
    config: TrainConfig | None = None,
    *,
    eval_episodes: Sequence[EpisodeLike] | None = None,
    architecture: dict[str, Any] | None = None,
    embodiment_tag: str | EmbodimentTag = EmbodimentTag.NEW_EMBODIMENT,
    training_info: dict[str, Any] | None = None,
) -> TrainResult:
    """Train on in-memory episodes (``policyserve.data.lerobot.Episode`` or look-alikes); see :class:`Trainer`."""
    trainer = Trainer(train_episodes, configs, output_dir, config or TrainConfig(), eval_episodes=eval_episodes,
                      architecture=architecture, embodiment_tag=embodiment_tag, training_info=training_info)
    return trainer.run()


def resolve_training_configs(
    dataset: Any, embodiment_tag: str | None, modality_config_path: str | Path | None, action_horizon: int = 16
) -> tuple[ModalityConfigs, str]:
    """Modality configs (file > registered tag > inferred from the dataset) and the tag to record."""
    from ..registry import get_modality_configs, load_modality_config_file

    tag = canonical_tag(embodiment_tag) if embodiment_tag else EmbodimentTag.NEW_EMBODIMENT.value
    if modality_config_path:
        return load_modality_config_file(modality_config_path)[0], tag
    if embodiment_tag and tag != EmbodimentTag.NEW_EMBODIMENT.value:
        return get_modality_configs(tag), tag
    return dataset.infer_modality_configs(action_horizon=action_horizon), tag


def train_from_dataset(
    dataset_path: str | Path,
    output_dir: str | Path,
    config: TrainConfig | None = None,
    *,
    embodiment_tag: str | None = None,
    modality_config_path: str | Path | None = None,
    action_horizon: int = 16,
    architecture: dict[str, Any] | None = None,
    eval_fraction: float = 0.1,
) -> TrainResult:
    """Train on a LeRobot dataset directory: "train" split for training, "eval" split for the eval loss.

    Without declared splits the last ``eval_fraction`` of the episodes (at least one, when there are
    five or more) is held out for the eval loss.
    """
    from ..data.lerobot import LeRobotDataset

    dataset = LeRobotDataset(dataset_path)
    configs, tag = resolve_training_configs(dataset, embodiment_tag, modality_config_path, action_horizon)
    video_keys = list(configs["video"].modality_keys) if "video" in configs else []
    train_ids = dataset.split("train")
    declared = dataset.info.get("splits") or {}
    eval_ids = [i for i in dataset.split("eval") if i not in set(train_ids)] if "eval" in declared else []
    if not eval_ids and len(train_ids) >= 5 and eval_fraction > 0:
        n_eval = max(1, round(eval_fraction * len(train_ids)))
        train_ids, eval_ids = train_ids[:-n_eval], train_ids[-n_eval:]
    log.info("loading %d train / %d eval episodes from %s", len(train_ids), len(eval_ids), dataset_path)
    train_eps = [dataset.load_episode(i, video_keys=video_keys) for i in train_ids]
    eval_eps = [dataset.load_episode(i, video_keys=video_keys) for i in eval_ids]
    info = {"dataset": str(Path(dataset_path).resolve()), "train_episodes": train_ids, "eval_episodes": eval_ids}
    return train_policy(train_eps, configs, output_dir, config, eval_episodes=eval_eps or None,
                        architecture=architecture, embodiment_tag=tag, training_info=info)


def camera_sizes(episodes: Sequence[Any]) -> dict[str, list[int]]:
    """(H, W) of each camera in the training episodes (``videos[key]`` is (T, H, W, 3)), as the checkpoint
    records it; a camera recorded at several sizes is left out."""
    sizes: dict[str, set[tuple[int, int]]] = {}
    for episode in episodes:
        for key, frames in episode.videos.items():
            sizes.setdefault(key, set()).add((int(frames.shape[1]), int(frames.shape[2])))
    return {key: list(next(iter(found))) for key, found in sizes.items() if len(found) == 1}
