"""Scaling out: the model server on Ray policy replicas.

Section ``model-server``: a tiny trained checkpoint (as in benchmarks/serving.py) served by
``policyserve serve --model-path`` in-process (reference) and with ``--replicas 1`` and ``--replicas 2``
(Ray Serve on a local Ray instance); closed-loop client processes send get_action (B=1). Prints
requests/s, p50/p99 latency, merged batch sizes, the 2-vs-1-replica ratio, and the peak memory (VmHWM)
of each replica process and of the front door.

Each section is one function in SECTIONS; ``--sections`` picks which run.

    python benchmarks/scale.py [--sections model-server] [--clients 8] [--seconds 6]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import make_checkpoint, run_clients, show, start_model_server  # noqa: E402  (puts tests/ on the path)

from helpers import descendants  # noqa: E402


def _peak_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def replica_peaks(server_pid: int) -> list[float]:
    """Peak resident memory (MiB) of each Ray Serve replica process started under ``server_pid``."""
    peaks = []
    for pid in descendants(server_pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"ServeReplica" in f.read():
                    peaks.append(_peak_mb(pid))
        except OSError:
            continue
    return peaks


def model_server_section(args: argparse.Namespace) -> None:
    print(f"== model server: {args.clients} client processes, closed loop, {args.seconds:.0f} s per run, "
          f"B=1 per request, {os.cpu_count()} CPUs")
    print(f"{'server':<34}{'req/s':>9}{'p50 ms':>10}{'p99 ms':>10}   merged batch sizes (count)")
    rows, memory = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_checkpoint(Path(tmp), args.image_size)
        for name, extra in (("in-process (no Ray)", ()), ("--replicas 1", ("--replicas", "1")),
                            ("--replicas 2", ("--replicas", "2"))):
            proc, port = start_model_server(checkpoint, *extra)
            try:
                rows[name] = run_clients("ours", port, args.clients, args.seconds, args.image_size)
                memory[name] = (_peak_mb(proc.pid), replica_peaks(proc.pid))
            finally:
                proc.terminate()
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
            show(name, rows[name])
    print("\npeak memory (VmHWM, MiB)")
    for name, (front, replicas) in memory.items():
        per_replica = ", ".join(f"{m:.0f}" for m in replicas) or "-"
        print(f"  {name:<24} front door {front:6.0f}   replicas: {per_replica}")
    ratio = rows["--replicas 2"]["req_per_s"] / rows["--replicas 1"]["req_per_s"]
    print(f"\n--replicas 2 / --replicas 1 = {ratio:.2f}x throughput")


SECTIONS: dict[str, Callable[[argparse.Namespace], None]] = {"model-server": model_server_section}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--image-size", type=int, default=84)
    args = parser.parse_args()
    for name in args.sections:
        SECTIONS[name](args)


if __name__ == "__main__":
    main()
