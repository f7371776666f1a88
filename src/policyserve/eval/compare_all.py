"""Dataset-wide model-vs-replay comparison: every demo of the HDF5 file, one aggregate report and summary plot.

:func:`run_all_comparisons` runs :func:`~policyserve.eval.compare.run_comparison` for each demo in this process
(per-demo outputs under ``<output_dir>/demo_<N>/``); :func:`policyserve.eval.distributed.run_distributed_comparisons`
does the same on Ray workers. Both end in an :class:`AggregateComparison`: per demo the first eef divergence
step, max end-effector distance and each side's success, written as ``aggregate.json``, ``aggregate.csv`` and
the summary plot ``summary.png``.
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
from .compare import ComparisonConfig, ComparisonResult, check_demo_range, hdf5_demo_indices, run_comparison
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

    @classmethod
    def from_result(cls, demo_index: int, result: ComparisonResult, output_dir: str | Path | None) -> DemoSummary:
        s = result.summary()
        return cls(demo_index, s["steps"], s["divergence_step"], s["action_divergence_step"], s["max_eef_distance"],
                   s["max_action_diff"], s["success_model"], s["success_replay"],
                   None if output_dir is None else str(output_dir))

    def line(self) -> str:
        """One human line for the progress output."""
        div = "none" if self.divergence_step is None else self.divergence_step
        return (f"demo {self.demo_index}: eef divergence step {div}, max eef distance {self.max_eef_distance:.4f} m, "
                f"success model {self.success_model} replay {self.success_replay}")


@dataclass
class AggregateComparison:
    """Every demo's :class:`DemoSummary`, the comparison config and timing, and the files written."""

    demos: list[DemoSummary]
    config: dict[str, Any]
    timing: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        diverged = [d.divergence_step for d in self.demos if d.divergence_step is not None]
        return {
            "demos": len(self.demos),
            "diverged": len(diverged),
            "median_divergence_step": float(np.median(diverged)) if diverged else None,
            "success_model": sum(d.success_model for d in self.demos),
            "success_replay": sum(d.success_replay for d in self.demos),
            "max_eef_distance": max((d.max_eef_distance for d in self.demos), default=0.0),
        }

    def summary_line(self) -> str:
        s = self.summary()
        median = "" if s["median_divergence_step"] is None else f", median first divergence step " \
                                                                 f"{s['median_divergence_step']:g}"
        return (f"{s['demos']} demos: {s['diverged']} diverged (eef distance > "
                f"{self.config.get('eef_threshold', 0.0):g} m){median}; success model {s['success_model']}/"
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
        columns = [f.name for f in DemoSummary.__dataclass_fields__.values()]
        with open(out / "aggregate.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(columns)
            for d in self.demos:
                w.writerow(["" if v is None else int(v) if isinstance(v, bool) else v for v in asdict(d).values()])
        plot_summary(self, out / "summary.png")
        (out / "aggregate.json").write_text(json.dumps(self.to_dict(), indent=2))
        return self.files


def prepare_demos(config: ComparisonConfig, demo_indices: Sequence[int] | None = None) -> list[int]:
    """The demos to compare (default: all of ``config.hdf5_path``), each checked for ``config.start_step``."""
    demos = hdf5_demo_indices(config.hdf5_path) if demo_indices is None else [int(d) for d in demo_indices]
    if not demos:
        raise ConfigError(f"{config.hdf5_path} has no demos (no data/demo_N groups) to compare")
    for demo in demos:
        check_demo_range(config.hdf5_path, demo, config.start_step)
    return demos


def run_all_comparisons(model: BasePolicy, replay: BasePolicy, config: ComparisonConfig,
                        demo_indices: Sequence[int] | None = None) -> AggregateComparison:
    """The comparison of every demo (or ``demo_indices``) in this process, one after another; per-demo outputs
    go to ``<config.output_dir>/demo_<N>/`` and the aggregate report to ``config.output_dir``."""
    demos = prepare_demos(config, demo_indices)
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


def plot_summary(report: AggregateComparison, path: str | Path) -> None:
    """Per demo: first eef divergence step (bars; green hatched = never diverged over the compared steps),
    max eef distance against the threshold, and model/replay success (green dot = success, red cross = failure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    demos = report.demos
    x = np.arange(len(demos))
    labels = [str(d.demo_index) for d in demos]
    fig, axes = plt.subplots(3, 1, figsize=(max(8.0, 0.45 * len(demos) + 3), 7), sharex=True,
                             gridspec_kw={"height_ratios": [3, 2, 1.2]})
    ax = axes[0]
    for i, d in enumerate(demos):
        if d.divergence_step is None:
            ax.bar(i, d.steps, color="tab:green", alpha=0.35, hatch="//", edgecolor="tab:green")
            ax.text(i, d.steps, "none", ha="center", va="bottom", fontsize=7)
        else:
            ax.bar(i, d.divergence_step, color="tab:red")
            ax.text(i, d.divergence_step, str(d.divergence_step), ha="center", va="bottom", fontsize=7)
    ax.set_ylabel("first divergence step")
    ax.set_title("first eef divergence step (red) | never diverged: green hatched, bar = steps compared", fontsize=8)
    ax = axes[1]
    threshold = float(report.config.get("eef_threshold", 0.0))
    ax.bar(x, [d.max_eef_distance for d in demos],
           color=["tab:red" if d.max_eef_distance > threshold else "tab:green" for d in demos])
    ax.axhline(threshold, color="gray", ls=":", lw=1, label=f"threshold {threshold:g} m")
    ax.set_ylabel("max eef dist (m)")
    ax.legend(fontsize=7, loc="upper right")
    ax = axes[2]
    for row, side in enumerate(("model", "replay")):
        ok = np.array([getattr(d, f"success_{side}") for d in demos], dtype=bool)
        ax.scatter(x[ok], np.full(ok.sum(), row), marker="o", s=60, color="tab:green")
        ax.scatter(x[~ok], np.full((~ok).sum(), row), marker="x", s=60, color="tab:red")
    ax.set_yticks([0, 1], ["model", "replay"])
    ax.set_ylim(-0.6, 1.6)
    ax.set_ylabel("success")
    ax.set_xticks(x, labels)
    ax.set_xlabel("demo index")
    fig.suptitle(textwrap.fill(report.summary_line(), 100), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
