"""Dataset-wide model-vs-replay comparison: every demo of the HDF5 file, one aggregate report and summary plot.

:func:`run_all_comparisons` runs :func:`~policyserve.eval.compare.run_comparison` for each demo in this process
(per-demo outputs under ``<output_dir>/demo_<N>/``); :func:`policyserve.eval.distributed.run_distributed_comparisons`
does the same on Ray workers. Both end in an :class:`AggregateComparison`: per demo its length and split, the
first eef divergence step, the max end-effector distance, per action key (arm and gripper apart) the largest
action difference and the action-divergence step (:mod:`policyserve.eval.divergence` states the rule), and each
side's success, written as ``aggregate.json``, ``aggregate.csv`` and the summary plot ``summary.png``.
"""

from __future__ import annotations

import csv
import json
import textwrap
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..policies.base import BasePolicy
from ..data.demos import DemoFile
from .compare import ComparisonConfig, ComparisonResult, resolve_env, run_comparison
from .divergence import ACTION_WINDOW, divergence_steps, max_diff_per_key
from .rollout import config_dict


@dataclass
class DemoSummary:
    """One demo's comparison in the aggregate report."""

    demo_index: int
    steps: int
    divergence_step: int | None
    """First step whose end-effector distance exceeds ``eef_threshold`` (None: never)."""
    action_divergence_step: int | None
    max_eef_distance: float
    max_action_diff: float
    success_model: bool
    success_replay: bool
    output_dir: str | None = None
    length: int | None = None
    """Samples of the demo in the HDF5 file."""
    split: str | None = None
    """The dataset split the demo's episode belongs to ("train", "eval"), as the replay reports it."""
    max_action_diff_per_key: dict[str, float] = field(default_factory=dict)
    action_divergence_per_key: dict[str, int | None] = field(default_factory=dict)
    """Per action key, the divergence step under :mod:`policyserve.eval.divergence`'s rule (None: never)."""

    @classmethod
    def from_result(cls, demo_index: int, result: ComparisonResult, output_dir: str | Path | None) -> DemoSummary:
        s = result.summary()
        model = np.array([r.model_action for r in result.steps], dtype=np.float64)
        replay = np.array([r.replay_action for r in result.steps], dtype=np.float64)
        threshold = float(result.config.get("action_threshold", 0.1))
        window = int(result.config.get("action_window", ACTION_WINDOW))
        length = s.get("demo_length")
        if length is None and result.config.get("hdf5_path"):
            length = DemoFile(result.config["hdf5_path"]).length(demo_index)
        return cls(demo_index, s["steps"], s["divergence_step"], s["action_divergence_step"], s["max_eef_distance"],
                   s["max_action_diff"], s["success_model"], s["success_replay"],
                   None if output_dir is None else str(output_dir), length, s.get("demo_split"),
                   max_diff_per_key(model, replay, result.action_dims),
                   divergence_steps(model, replay, result.action_dims, threshold, window,
                                    resamples=result.model_resamples))

    def line(self) -> str:
        """One human line for the progress output."""
        div = "none" if self.divergence_step is None else self.divergence_step
        keys = ", ".join(f"{k} {'none' if v is None else v}" for k, v in self.action_divergence_per_key.items())
        diffs = ", ".join(f"{k} {v:.3f}" for k, v in self.max_action_diff_per_key.items())
        return (f"demo {self.demo_index}: eef divergence step {div}, max eef distance {self.max_eef_distance:.4f} m, "
                f"action divergence step {keys or 'none'} (max diff {diffs or 'none'}), "
                f"success model {self.success_model} replay {self.success_replay}")


@dataclass
class AggregateComparison:
    """Every demo's :class:`DemoSummary`, the comparison config and timing, and the files written."""

    demos: list[DemoSummary]
    config: dict[str, Any]
    timing: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)

    @property
    def action_keys(self) -> list[str]:
        return list(dict.fromkeys(k for d in self.demos for k in d.action_divergence_per_key))

    def summary(self) -> dict[str, Any]:
        diverged = [d.divergence_step for d in self.demos if d.divergence_step is not None]
        return {
            "demos": len(self.demos),
            "diverged": len(diverged),
            "median_divergence_step": float(np.median(diverged)) if diverged else None,
            "action_diverged_per_key": {k: sum(d.action_divergence_per_key.get(k) is not None for d in self.demos)
                                        for k in self.action_keys},
            "max_action_diff_per_key": {k: max(d.max_action_diff_per_key.get(k, 0.0) for d in self.demos)
                                        for k in self.action_keys},
            "success_model": sum(d.success_model for d in self.demos),
            "success_replay": sum(d.success_replay for d in self.demos),
            "max_eef_distance": max((d.max_eef_distance for d in self.demos), default=0.0),
        }

    def summary_line(self) -> str:
        s = self.summary()
        median = "" if s["median_divergence_step"] is None else f", median first divergence step " \
                                                                 f"{s['median_divergence_step']:g}"
        keys = ", ".join(f"{k} {n}" for k, n in s["action_diverged_per_key"].items())
        noise = f" + the model's own noise ({self.config['noise_samples']} resamples)" \
            if self.config.get("noise_samples") else ""
        actions = (f"; action divergence (> {self.config.get('action_threshold', 0.0):g}{noise} over "
                   f"{self.config.get('action_window', ACTION_WINDOW)} steps): {keys} demos" if keys else "")
        return (f"{s['demos']} demos: {s['diverged']} diverged (eef distance > "
                f"{self.config.get('eef_threshold', 0.0):g} m){median}{actions}; success model {s['success_model']}/"
                f"{s['demos']}, replay {s['success_replay']}/{s['demos']}")

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(), "demos": [asdict(d) for d in self.demos], "config": self.config,
                "timing": self.timing, "files": self.files}

    def save(self, out: str | Path) -> dict[str, str]:
        """Write ``aggregate.json``, ``aggregate.csv`` and ``summary.png`` under ``out``; returns their paths."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.files = {"json": str(out / "aggregate.json"), "csv": str(out / "aggregate.csv"),
                      "plot": str(out / "summary.png")}
        with open(out / "aggregate.csv", "w", newline="") as f:
            w = csv.writer(f)
            rows = [_csv_row(d, self.action_keys) for d in self.demos]
            w.writerow(list(rows[0]) if rows else [f.name for f in DemoSummary.__dataclass_fields__.values()])
            for row in rows:
                w.writerow(["" if v is None else int(v) if isinstance(v, bool) else v for v in row.values()])
        plot_summary(self, out / "summary.png")
        (out / "aggregate.json").write_text(json.dumps(self.to_dict(), indent=2))
        return self.files


def _csv_row(demo: DemoSummary, keys: list[str]) -> dict[str, Any]:
    """One CSV row: the scalar fields, then one column per action key for its max difference and divergence."""
    row = {k: v for k, v in asdict(demo).items() if not isinstance(v, dict)}
    row.update({f"max_action_diff_{k}": demo.max_action_diff_per_key.get(k) for k in keys})
    row.update({f"action_divergence_step_{k}": demo.action_divergence_per_key.get(k) for k in keys})
    return row


def prepare_demos(config: ComparisonConfig, demo_indices: Sequence[int] | None = None) -> list[int]:
    """The demos to compare (default: all of ``config.hdf5_path``), each checked for ``config.start_step``."""
    file = DemoFile(config.hdf5_path)
    demos = file.indices if demo_indices is None else [int(d) for d in demo_indices]
    if not demos:
        raise ConfigError(f"{config.hdf5_path} has no demos (no data/demo_N groups) to compare")
    for demo in demos:
        file.check_step(demo, config.start_step)
    return demos


def run_all_comparisons(model: BasePolicy, replay: BasePolicy, config: ComparisonConfig,
                        demo_indices: Sequence[int] | None = None) -> AggregateComparison:
    """The comparison of every demo (or ``demo_indices``) in this process, one after another; per-demo outputs
    go to ``<config.output_dir>/demo_<N>/`` and the aggregate report to ``config.output_dir``."""
    demos = prepare_demos(config, demo_indices)
    config = replace(config, env=resolve_env(config, DemoFile(config.hdf5_path)))
    out = Path(config.output_dir) if config.output_dir else None
    rows = []
    bar = None
    start = time.perf_counter()
    try:
        if config.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(demos), desc="compare", unit="demo")
        for demo in demos:
            folder = None if out is None else out / f"demo_{demo}"
            result = run_comparison(model, replay, replace(config, demo_index=demo, progress=False,
                                                           output_dir=None if folder is None else str(folder)))
            rows.append(DemoSummary.from_result(demo, result, folder))
            if bar is not None:
                bar.update(1)
                bar.write(rows[-1].line())
    finally:
        if bar is not None:
            bar.close()
    report = AggregateComparison(rows, config_dict(config), {"wall_s": time.perf_counter() - start})
    if out is not None:
        report.save(out)
    return report


def plot_summary(report: AggregateComparison, path: str | Path) -> dict[str, Any]:
    """Summary figure, one column per demo (tick label: demo index and split; eval demos shaded).

    Panels: the demo's length (grey) with the first eef divergence step (red bar) on one step axis, demos that
    never diverged marked apart in a strip of their own ("never", green) instead of as a bar; max eef distance
    against the threshold; per action key the divergence step (or "-"); model/replay success. Returns what was
    marked: ``never_diverged`` (demo indices), ``tick_labels``, ``eval_demos``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    demos = report.demos
    x = np.arange(len(demos))
    labels = [f"{d.demo_index}\n{d.split}" if d.split else str(d.demo_index) for d in demos]
    keys = report.action_keys
    fig, axes = plt.subplots(5, 1, figsize=(max(8.0, 0.5 * len(demos) + 3), 9.5), sharex=True,
                             gridspec_kw={"height_ratios": [0.6, 3, 2, 0.5 + 0.4 * max(len(keys), 1), 1.2]})
    eval_demos = [d.demo_index for d in demos if d.split == "eval"]
    for ax in axes:
        for i, d in enumerate(demos):
            if d.split == "eval":
                ax.axvspan(i - 0.5, i + 0.5, color="tab:purple", alpha=0.08, lw=0)
    never = [d.demo_index for d in demos if d.divergence_step is None]
    ax = axes[0]
    for i, d in enumerate(demos):
        if d.divergence_step is None:
            ax.text(i, 0.5, "never", ha="center", va="center", fontsize=7, color="tab:green", fontweight="bold")
        else:
            ax.text(i, 0.5, str(d.divergence_step), ha="center", va="center", fontsize=7, color="tab:red")
    ax.set_yticks([])
    ax.set_ylim(0, 1)
    ax.set_title("first eef divergence step per demo (\"never\" = did not diverge over the compared steps)",
                 fontsize=8)
    ax = axes[1]
    ax.bar(x, [d.length or d.steps for d in demos], color="lightgray", edgecolor="gray", width=0.8,
           label="demo length (steps)")
    ax.bar(x, [d.steps for d in demos], color="none", edgecolor="black", ls="--", width=0.8, label="steps compared")
    diverged = [(i, d.divergence_step) for i, d in enumerate(demos) if d.divergence_step is not None]
    if diverged:
        ax.bar([i for i, _ in diverged], [s for _, s in diverged], color="tab:red", width=0.4,
               label="first eef divergence step")
    ax.set_ylabel("steps")
    ax.legend(fontsize=7, loc="upper right")
    ax = axes[2]
    threshold = float(report.config.get("eef_threshold", 0.0))
    ax.bar(x, [d.max_eef_distance for d in demos],
           color=["tab:red" if d.max_eef_distance > threshold else "tab:green" for d in demos])
    ax.axhline(threshold, color="gray", ls=":", lw=1, label=f"threshold {threshold:g} m")
    ax.set_ylabel("max eef dist (m)")
    ax.legend(fontsize=7, loc="upper right")
    ax = axes[3]
    for row, key in enumerate(keys):
        for i, d in enumerate(demos):
            step = d.action_divergence_per_key.get(key)
            ax.text(i, row, "-" if step is None else str(step), ha="center", va="center", fontsize=7,
                    color="tab:green" if step is None else "tab:red")
    ax.set_yticks(range(len(keys)), keys)
    ax.set_ylim(-0.6, max(len(keys), 1) - 0.4)
    window = report.config.get("action_window", ACTION_WINDOW)
    ax.set_title(f"action divergence step per key (rule: policyserve.eval.divergence, threshold "
                 f"{report.config.get('action_threshold', 0.0):g}, window {window}; - = never)", fontsize=8)
    ax = axes[4]
    for row, side in enumerate(("model", "replay")):
        ok = np.array([getattr(d, f"success_{side}") for d in demos], dtype=bool)
        ax.scatter(x[ok], np.full(ok.sum(), row), marker="o", s=60, color="tab:green")
        ax.scatter(x[~ok], np.full((~ok).sum(), row), marker="x", s=60, color="tab:red")
    ax.set_yticks([0, 1], ["model", "replay"])
    ax.set_ylim(-0.6, 1.6)
    ax.set_ylabel("success")
    ax.set_xticks(x, labels)
    ax.set_xlim(-0.6, len(demos) - 0.4)
    ax.set_xlabel("demo index (split; eval demos shaded)")
    fig.suptitle(textwrap.fill(report.summary_line(), 110), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return {"never_diverged": never, "tick_labels": labels, "eval_demos": eval_demos}
