"""``policyserve train``: train policyserve's flow-matching policy on a LeRobot dataset."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` sub-command."""
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
    p.add_argument("--action-horizon", type=int, default=16, help="chunk length when the config is inferred")
    p.add_argument("--max-steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--save-steps", type=int, default=500)
    p.add_argument("--eval-steps", type=int, default=None, help="eval-loss interval (default: --save-steps)")
    p.add_argument("--learning-rate", type=float, default=3e-4)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--image-size", type=int, default=84, help="square size images are resized to")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--num-inference-steps", type=int, default=4, help="denoising steps at inference")
    p.add_argument("--num-threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-augment", action="store_true", help="disable random-shift/colour-jitter augmentation")
    p.add_argument("--no-resume", action="store_true", help="start from scratch even if checkpoints exist")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run training from parsed arguments; prints a JSON summary."""
    from ..errors import PolicyServeError
    from ..model.config import TrainConfig
    from ..model.train import train_from_dataset

    try:
        config = TrainConfig(
            max_steps=args.max_steps, batch_size=args.batch_size, save_steps=args.save_steps,
            eval_steps=args.eval_steps, learning_rate=args.learning_rate, warmup_steps=args.warmup_steps,
            seed=args.seed, device=args.device, augment=not args.no_augment, resume=not args.no_resume,
            progress=not args.no_progress, num_threads=args.num_threads,
        )
        architecture = {"image_size": args.image_size, "d_model": args.d_model,
                        "num_inference_steps": args.num_inference_steps}
        result = train_from_dataset(
            args.dataset_path, args.output_dir, config, embodiment_tag=args.embodiment_tag,
            modality_config_path=args.modality_config_path, action_horizon=args.action_horizon,
            architecture=architecture,
        )
    except PolicyServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = {
        "output_dir": str(result.output_dir), "steps": result.steps,
        "final_train_loss": result.train_losses[-1][1] if result.train_losses else None,
        "final_eval_loss": result.eval_losses[-1][1] if result.eval_losses else None,
        "resumed_from": str(result.resumed_from) if result.resumed_from else None,
        "steps_per_second": round(result.steps_per_second, 3),
    }
    print(json.dumps(summary, indent=1))
    return 0
