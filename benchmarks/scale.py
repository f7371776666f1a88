"""Scaling out on Ray: distributed rollout workers and policy replicas, in one run.

Section ``rollout``: env steps/s of ``rollout`` in one process, then with 1 and 2 Ray worker actors
(``--workers``, a local Ray instance started once for both), all against the same policy server (the
``franka_panda`` constant policy served by ``policyserve serve`` in a subprocess; it never succeeds, so every
episode runs its full length and every run steps the same number of envs). Each worker owns ``--n-envs`` envs
with two cameras. Prints env steps/s (from the first ready worker to the end; a single-process run's wall time
also excludes building its envs), the ratio to the single-process run, the worker startup time, and peak
memory (RSS) per worker process; ``--repeats`` alternating rounds, then medians and their ratios to the
single-process median (the load average is printed: other processes on the machine take cores from the workers).

Section ``model-server``: a tiny trained checkpoint (as in benchmarks/serving.py) served by
``policyserve serve --model-path`` in-process (reference) and with ``--replicas 1`` and ``--replicas 2``
(Ray Serve on a local Ray instance); closed-loop client processes send get_action (B=1). Prints
requests/s, p50/p99 latency, merged batch sizes, the 2-vs-1-replica ratio, and the peak memory (VmHWM)
of each replica process and of the front door.

Each section is one function in SECTIONS; ``--sections`` picks which run.

    python benchmarks/scale.py [--sections rollout model-server] [--episodes 8] [--steps 80] [--workers 1 2]
                               [--clients 8] [--seconds 6] [--quick]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import HEADER, make_checkpoint, run_clients, show, start_model_server  # noqa: E402  (puts tests/ on the path)

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
    print(HEADER)
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


def rollout_section(task: str = "lift", episodes: int = 8, steps: int = 80, camera_size: int = 128,
                    n_action_steps: int = 8, n_envs: int = 1, workers: tuple[int, ...] = (1, 2),
                    repeats: int = 2) -> None:
    """Print env steps/s of a single-process rollout and of distributed rollouts with each count of ``workers``
    (``repeats`` alternating rounds; medians and their ratios to the single-process median)."""
    from policyserve.launch import ServerProcess
    from policyserve.client.connect import connect_policy
    from policyserve.client.driver import DriverConfig
    from policyserve.eval.distributed import DistributedConfig, ServerAddress, run_distributed_rollout
    from policyserve.eval.envs import EnvConfig
    from policyserve.sim.envs import FrankaEnvConfig
    from policyserve.eval.rollout import RolloutConfig, run_rollout
    from policyserve.cluster.runtime import ray_session

    config = RolloutConfig(env=EnvConfig(task=task, sim=FrankaEnvConfig(camera_size=(camera_size, camera_size))),
                           driver=DriverConfig(n_action_steps=n_action_steps), n_episodes=episodes, n_envs=n_envs,
                           max_episode_steps=steps, progress=False)
    print(f"rollout: task={task}, {episodes} episodes x {steps} steps, {n_envs} env(s) per process/worker, cameras "
          f"2x{camera_size}^2, n_action_steps={n_action_steps}, constant policy server in a subprocess; "
          f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at start")
    print(f"{'run':>16} {'env steps':>9} {'wall s':>7} {'steps/s':>8} {'startup s':>9} {'peak RSS MiB per worker':>24}")
    rates: dict[str, list[float]] = {}
    peaks: dict[str, list[float]] = {}

    def show(name: str, t: dict, startup: str, rss: str) -> None:
        rates.setdefault(name, []).append(t["env_steps_per_s"])
        print(f"{name:>16} {t['env_steps']:>9} {t['wall_s']:>7.2f} {t['env_steps_per_s']:>8.1f} {startup:>9} {rss:>24}")

    with ServerProcess(["--embodiment-tag", "franka_panda"], name="constant server") as server:
        with ray_session(num_cpus=max(workers)):
            for _ in range(repeats):
                client = connect_policy(server.host, server.port)
                try:
                    t = run_rollout(client, config).timing
                finally:
                    client.close()
                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                show("single process", t, "-", f"{rss:.0f} (this process)")
                for k in workers:
                    report = run_distributed_rollout(ServerAddress(server.host, server.port), config,
                                                     DistributedConfig(workers=k))
                    t = report.timing
                    assert [e.episode for e in report.episodes] == list(range(episodes))
                    peaks.setdefault(f"{k} worker(s)", []).extend(t["worker_peak_rss_mb"])
                    show(f"{k} worker(s)", t, f"{t['startup_s']:.1f}",
                         ", ".join(f"{m:.0f}" for m in t["worker_peak_rss_mb"]))
    base = statistics.median(rates["single process"])
    print(f"median env steps/s ({repeats} rounds; load average {os.getloadavg()[0]:.1f} at the end):")
    for name, values in rates.items():
        peak = f", peak RSS per worker up to {max(peaks[name]):.0f} MiB" if name in peaks else ""
        print(f"  {name:>16}: {statistics.median(values):6.1f} steps/s = {statistics.median(values) / base:.2f}x "
              f"the single process{peak}")


def rollout_workers_section(args: argparse.Namespace) -> None:
    rollout_section(args.task, args.episodes, args.steps, args.camera_size, args.n_action_steps, args.n_envs,
                    tuple(args.workers), args.repeats)


SECTIONS: dict[str, Callable[[argparse.Namespace], None]] = {
    "rollout": rollout_workers_section, "model-server": model_server_section,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--image-size", type=int, default=84)
    parser.add_argument("--task", default="lift")
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--steps", type=int, default=80, help="env steps per episode (the constant policy never succeeds)")
    parser.add_argument("--camera-size", type=int, default=128)
    parser.add_argument("--n-action-steps", type=int, default=8)
    parser.add_argument("--n-envs", type=int, default=1, help="envs per process / per worker")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds (medians are compared)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check that the script runs")
    args = parser.parse_args()
    if args.quick:
        args.episodes, args.steps, args.camera_size, args.repeats = 2, 8, 32, 1
        args.clients, args.seconds, args.image_size = 2, 1.0, 32
    for name in args.sections:
        SECTIONS[name](args)


if __name__ == "__main__":
    main()
