"""Benchmark policyserve's flow-matching policy: inference latency (B = 1, 8, 32), training steps/s, and the
cost of a real-time-chunking (RTC) request against a plain one at B = 1 and 8.

Uses the default architecture on the franka_panda layout (two 84x84 cameras, eef state, 16-step chunks)
with synthetic episodes, so it needs no dataset or simulator:

    python benchmarks/model.py [--threads 2] [--image-size 84] [--batch-sizes 1 8 32] [--train-batch-size 32]

Runs on CPU and, when available, on CUDA as well.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import numpy as np
import torch

from policyserve.model.config import TrainConfig
from policyserve.model.policy import ModelPolicy
from policyserve.model.synthetic import TASKS, make_episodes
from policyserve.model.train import Trainer
from policyserve.registry import get_embodiment_spec

LANG = "annotation.human.action.task_description"


def observation(batch: int, image_size: int, spec) -> dict:
    """A random franka_panda observation batch."""
    rng = np.random.default_rng(0)
    return {
        "video": {k: rng.integers(0, 255, (batch, 1, image_size, image_size, 3), dtype=np.uint8)
                  for k in spec.modality_configs["video"].modality_keys},
        "state": {k: rng.normal(size=(batch, 1, d)).astype(np.float32) for k, d in spec.dims.state.items()},
        "language": {LANG: [[TASKS[0]]] * batch},
    }


def rtc_options(policy: ModelPolicy, obs: dict, delay: int = 4, execution_horizon: int = 8,
                guidance: str = "vjp") -> dict:
    """Options of an RTC request whose committed prefix is the remainder of a previous chunk."""
    previous, _ = policy.get_action(obs, {"seed": 1})
    prefix = {k: v[:, execution_horizon:] for k, v in previous.items()}
    return {"seed": 0, "rtc": {"prefix": prefix, "inference_delay": delay, "execution_horizon": execution_horizon,
                               "guidance": guidance}}


def rtc_cost(policy: ModelPolicy, image_size: int, spec, batch_sizes: list[int], reps: int,
             guidance: str = "vjp") -> dict[str, float]:
    """Median latency of an RTC request (guided with ``guidance``) and of a plain one, and their ratio, per batch
    size."""
    row: dict[str, float] = {}
    for batch in batch_sizes:
        obs = observation(batch, image_size, spec)
        plain, guided = paired_latency_ms(policy, obs, reps, {"seed": 0},
                                          rtc_options(policy, obs, guidance=guidance))
        row.update({f"plain_ms_B{batch}": round(plain, 1), f"rtc_ms_B{batch}": round(guided, 1),
                    f"rtc_cost_B{batch}": round(guided / plain, 2)})
    return row


def paired_latency_ms(policy: ModelPolicy, obs: dict, reps: int, first: dict, second: dict) -> tuple[float, float]:
    """Median milliseconds of ``policy.get_action`` with ``first`` and with ``second`` options, timed alternately
    (so a change in the machine's load falls on both alike), after two warm-up calls of each."""
    times: tuple[list[float], list[float]] = ([], [])
    for rep in range(reps + 2):
        for options, out in ((first, times[0]), (second, times[1])):
            ms = call_ms(policy, obs, options)
            if rep >= 2:
                out.append(ms)
    return statistics.median(times[0]), statistics.median(times[1])


def call_ms(policy: ModelPolicy, obs: dict, options: dict) -> float:
    """Milliseconds of one ``policy.get_action`` call (synchronized on CUDA)."""
    start = time.perf_counter()
    policy.get_action(obs, options)
    if policy.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000


def latency_ms(policy: ModelPolicy, obs: dict, reps: int, options: dict | None = None) -> tuple[float, float]:
    """(median, p90) milliseconds of ``policy.get_action`` after two warm-up calls."""
    options = options or {"seed": 0}
    for _ in range(2):
        policy.get_action(obs, options)
    times = [call_ms(policy, obs, options) for _ in range(reps)]
    return statistics.median(times), float(np.percentile(times, 90))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=84)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--train-batch-size", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--rtc-batch-sizes", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = get_embodiment_spec("franka_panda")
    episodes = make_episodes(spec.modality_configs, spec.dims.state, spec.dims.action, n_episodes=8, length=40,
                             image_hw=(args.image_size, args.image_size))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = []
    for device in devices:
        with tempfile.TemporaryDirectory() as out:
            config = TrainConfig(max_steps=args.train_steps + 2, batch_size=args.train_batch_size, device=device,
                                 progress=False, resume=False)
            trainer = Trainer(episodes, spec.modality_configs, out, config,
                              architecture={"image_size": args.image_size}, embodiment_tag="franka_panda")
            for _ in range(2):
                trainer.train_step()
            start = time.perf_counter()
            for _ in range(args.train_steps):
                trainer.train_step()
            if device == "cuda":
                torch.cuda.synchronize()
            steps_per_s = args.train_steps / (time.perf_counter() - start)
            params = sum(p.numel() for p in trainer.model.parameters())
            policy = ModelPolicy(trainer.model, trainer.bundle, device=device)
            row = {"device": device, "threads": args.threads, "params": params,
                   "train_batch_size": args.train_batch_size, "train_steps_per_s": round(steps_per_s, 2)}
            for batch in args.batch_sizes:
                median, p90 = latency_ms(policy, observation(batch, args.image_size, spec), args.reps)
                row[f"latency_ms_B{batch}"] = round(median, 1)
                row[f"latency_p90_ms_B{batch}"] = round(p90, 1)
            row.update(rtc_cost(policy, args.image_size, spec, args.rtc_batch_sizes, args.reps))
            results.append(row)
    print(f"policyserve model benchmark: {args.image_size}x{args.image_size} images x2 cameras, "
          f"action chunk 16x7, 4 denoising steps, torch {torch.__version__}")
    header = "".join(f"{'B=' + str(b) + ' ms':>12}" for b in args.batch_sizes)
    print(f"{'device':<8}{'params':>10}{'train steps/s':>15}{header}")
    for row in results:
        print(f"{row['device']:<8}{row['params']:>10}{row['train_steps_per_s']:>15}"
              + "".join(f"{row[f'latency_ms_B{b}']:>12}" for b in args.batch_sizes))
    print("RTC request cost (inference delay 4, execution horizon 8) vs a plain request, median ms:")
    for row in results:
        print(f"{row['device']:<8}" + "".join(
            f"  B={b}: {row[f'rtc_ms_B{b}']} vs {row[f'plain_ms_B{b}']} ({row[f'rtc_cost_B{b}']}x)"
            for b in args.rtc_batch_sizes))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
