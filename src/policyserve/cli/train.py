"""``policyserve train``: train policyserve's flow-matching policy on a LeRobot dataset."""

from __future__ import annotations

import argparse
import json

from .common import add_progress, embodiment_hint
from .flags import add_config_flags, config_kwargs

ARCHITECTURE = ("image_size", "d_model", "num_inference_steps", "rtc_max_delay")
"""ModelConfig fields the command line sets (the rest keep their defaults)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` sub-command; its flags come from TrainConfig and ModelConfig."""
    from ..model.config import ModelConfig, TrainConfig

    p = subparsers.add_parser(
        "train",
        help="train a visuomotor flow-matching policy on a LeRobot dataset",
        description="Train policyserve's action-chunking flow-matching policy. Writes checkpoint-<step>/ "
        "directories, the final model and loss_curve.png into --output-dir, and resumes from the last "
        "checkpoint there unless --no-resume.",
    )
    p.add_argument("--dataset-path", required=True, help="LeRobot dataset directory")
    p.add_argument("--output-dir", required=True, help="where checkpoints and the final model go")
    p.add_argument("--embodiment-tag", default=None,
                   help="registered embodiment whose modality config to use and to record (default: new_embodiment "
                        "with the config inferred from the dataset)")
    p.add_argument("--modality-config-path", default=None, help="modality config JSON (overrides the tag's)")
    p.add_argument("--action-horizon", type=int, default=16,
                   help="chunk length when the config is inferred (default 16)")
    train = add_config_flags(p, TrainConfig, ["max_steps", "batch_size", "save_steps", "eval_steps",
                                              "learning_rate", "warmup_steps", "seed", "device", "num_threads",
                                              "augment", "resume"])
    train.update(add_progress(p, TrainConfig))
    architecture = add_config_flags(p, ModelConfig, ARCHITECTURE)
    p.set_defaults(func=lambda args: run(args, train, architecture), error_hint=embodiment_hint)


def run(args: argparse.Namespace, train: dict[str, str], architecture: dict[str, str]) -> int:
    """Run training from parsed arguments; prints a JSON summary."""
    from ..model.config import TrainConfig
    from ..model.train import train_from_dataset

    result = train_from_dataset(
        args.dataset_path, args.output_dir, TrainConfig(**config_kwargs(args, train)),
        embodiment_tag=args.embodiment_tag, modality_config_path=args.modality_config_path,
        action_horizon=args.action_horizon, architecture=config_kwargs(args, architecture),
    )
    summary = {
        "output_dir": str(result.output_dir), "steps": result.steps,
        "final_train_loss": result.train_losses[-1][1] if result.train_losses else None,
        "final_eval_loss": result.eval_losses[-1][1] if result.eval_losses else None,
        "resumed_from": str(result.resumed_from) if result.resumed_from else None,
        "steps_per_second": round(result.steps_per_second, 3),
    }
    print(json.dumps(summary, indent=1))
    return 0
