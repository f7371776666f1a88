"""Serving under load: 8 client processes, each sending get_action in a closed loop.

(a) the trained model (a tiny checkpoint this script makes: the built-in flow-matching policy, 84x84
    cameras, a few training steps) served by ``policyserve serve --model-path``, with continuous batching
    (default) and with ``--max-batch-size 1``;
(b) a synthetic policy costing 20 ms + 1 ms per sample, served by our server and by the upstream serial
    scheme (GR00T's REQ/REP loop with np.save-in-msgpack, tests/upstream_gr00t.py) with the same cost;
(c) the same trained model to openpi clients (``openpi_client.WebsocketClientPolicy``): through our openpi
    door (``serve --protocol openpi``) and through openpi's own ``WebsocketPolicyServer`` (PyPI package
    ``openpi-server``, installed with --no-deps by scripts/install.sh; it serves one request at a time on its
    event loop), which calls the same loaded policy through the same openpi key mapping.

Prints aggregate requests/s, p50/p99 latency and the merged batch sizes, and the ratios against the
baselines (goals: model >= 3x unbatched, synthetic >= 5x upstream, openpi door within 10% of the GR00T
door and >= 3x openpi's server).

    python benchmarks/serving.py [--clients 8] [--seconds 6] [--no-openpi]

The model servers use OMP_NUM_THREADS=2 unless the environment sets it (on a loaded machine, 1 avoids
OpenMP's spinning threads fighting for cores).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
LANG = "annotation.human.action.task_description"


def franka_observation(image_size: int, seed: int) -> dict:
    from policyserve.registry import get_embodiment_spec

    spec = get_embodiment_spec("franka_panda")
    rng = np.random.default_rng(seed)
    return {
        "video": {k: rng.integers(0, 255, (1, 1, image_size, image_size, 3), dtype=np.uint8)
                  for k in spec.modality_configs["video"].modality_keys},
        "state": {k: rng.normal(size=(1, 1, d)).astype(np.float32) for k, d in spec.dims.state.items()},
        "language": {LANG: [["lift the cube"]]},
    }


# -- clients ---------------------------------------------------------------------------------------------------
def openpi_observation(image_size: int, seed: int) -> dict:
    """:func:`franka_observation` as an openpi client sends it (flat keys, one frame, concatenated state)."""
    nested = franka_observation(image_size, seed)
    return {
        "observation/image": nested["video"]["ego_view"][0, 0],
        "observation/wrist_image": nested["video"]["wrist_view"][0, 0],
        "observation/state": np.concatenate([v[0, 0] for v in nested["state"].values()]),
        "prompt": "lift the cube",
    }


def client_main(kind: str, port: int, seconds: float, image_size: int, seed: int, start_at: float, out) -> None:
    """Closed loop until ``start_at + seconds``; sends (latencies ms, merged sizes) back."""
    obs = franka_observation(image_size, seed)
    if kind == "openpi":
        from openpi_client.websocket_client_policy import WebsocketClientPolicy

        openpi_client = WebsocketClientPolicy("127.0.0.1", port)
        openpi_obs = openpi_observation(image_size, seed)

        def call() -> tuple:
            reply = openpi_client.infer(openpi_obs)
            return None, {"server_timing": reply["server_timing"]} if "merged_requests" in reply.get(
                "server_timing", {}) else None

        client = openpi_client._ws  # closed below
    elif kind == "upstream":
        from upstream_gr00t import UpstreamClient

        client = UpstreamClient(port, timeout_ms=60000)
        call = lambda: (client.call_endpoint("get_action", {"observation": obs, "options": None}), None)  # noqa: E731
    else:
        from policyserve import PolicyClient

        client = PolicyClient(host="127.0.0.1", port=port, timeout_ms=60000)
        call = lambda: client.get_action(obs)  # noqa: E731
    call()  # warm-up, not counted
    while time.time() < start_at:
        time.sleep(0.001)
    latencies, merged, timing = [], [], []
    end = start_at + seconds
    while time.time() < end:
        t0 = time.perf_counter()
        reply = call()
        latencies.append((time.perf_counter() - t0) * 1000)
        info = reply[1] if kind != "upstream" else None
        if info:
            merged.append(info["server_timing"]["merged_requests"])
            timing.append((info["server_timing"]["queue_ms"], info["server_timing"]["policy_ms"]))
    out.put((latencies, merged, timing))
    client.close()


def openpi_server_main(checkpoint: str, port: int, ready) -> None:
    """openpi's own WebsocketPolicyServer around the same loaded policy and openpi key mapping."""
    os.environ.setdefault("OMP_NUM_THREADS", "2")  # as the model servers (start_model_server)
    from openpi_server import WebsocketPolicyServer

    from policyserve.model import load_policy
    from policyserve.wire.openpi_keys import OpenpiKeyMap, OpenpiMapping

    policy = load_policy(checkpoint)
    mapping = OpenpiMapping(OpenpiKeyMap(), policy.get_modality_config(), policy.get_modality_dims())

    class Infer:
        def infer(self, obs: dict) -> dict:
            action, _ = policy.get_action(mapping.observation(obs))
            return mapping.actions_reply(action)

        def reset(self) -> None:
            policy.reset()

    ready.put(port)
    WebsocketPolicyServer(Infer(), host="127.0.0.1", port=port, metadata=mapping.metadata()).serve_forever()


def start_openpi_server(checkpoint: Path) -> tuple[mp.Process, int]:
    import socket

    with socket.socket() as probe:  # openpi's server reports no port: pick a free one
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ctx = mp.get_context("spawn")
    ready = ctx.Queue()
    proc = ctx.Process(target=openpi_server_main, args=(str(checkpoint), port, ready), daemon=True)
    proc.start()
    ready.get(timeout=120)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # listening once a connection is accepted
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("openpi's server did not start")


def run_clients(kind: str, port: int, n: int, seconds: float, image_size: int) -> dict:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 4.0  # every client connected and warmed up before the clock starts
    procs = [ctx.Process(target=client_main, args=(kind, port, seconds, image_size, i, start_at, out))
             for i in range(n)]
    for p in procs:
        p.start()
    results = [out.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join(30)
    latencies = [x for lat, _, _ in results for x in lat]
    merged = Counter(x for _, m, _ in results for x in m)
    timing = [t for _, _, ts in results for t in ts]
    ordered = sorted(latencies) or [float("nan")]  # no request finished in the window (an overloaded machine)
    return {
        "req_per_s": len(latencies) / seconds,
        "p50_ms": statistics.median(ordered),
        "p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "queue_ms": statistics.median(q for q, _ in timing) if timing else None,
        "policy_ms": statistics.median(p for _, p in timing) if timing else None,
        "merged": dict(sorted(merged.items())),
    }


# -- servers ---------------------------------------------------------------------------------------------------
class SyntheticPolicy:
    """20 ms + 1 ms per sample, for both servers."""

    @staticmethod
    def cost(batch: int) -> None:
        time.sleep(0.020 + 0.001 * batch)


def synthetic_server_main(kind: str, ready) -> None:
    from policyserve import ConstantPolicy, PolicyServer
    from policyserve.registry import get_embodiment_spec

    spec = get_embodiment_spec("franka_panda")

    class Synthetic(ConstantPolicy):
        def _get_action(self, observation, options=None):
            action, info = super()._get_action(observation, options)
            SyntheticPolicy.cost(action["arm"].shape[0])
            return action, info

    policy = Synthetic(spec.modality_configs, spec.dims)
    if kind == "upstream":
        from upstream_gr00t import UpstreamServer

        def get_action(observation, options=None):
            return list(policy.get_action(observation, options))

        server = UpstreamServer({"get_action": get_action}).start()
        ready.put(server.port)
        while True:
            time.sleep(3600)
    server = PolicyServer(policy, port=0, verbose=False)
    server.bind()
    ready.put(server.port)
    server.run()


def start_synthetic(kind: str) -> tuple[mp.Process, int]:
    ctx = mp.get_context("spawn")
    ready = ctx.Queue()
    proc = ctx.Process(target=synthetic_server_main, args=(kind, ready), daemon=True)
    proc.start()
    return proc, ready.get(timeout=60)


def make_checkpoint(directory: Path, image_size: int) -> Path:
    from policyserve.model.checkpoint import save_checkpoint
    from policyserve.model.config import TrainConfig
    from policyserve.model.synthetic import make_episodes
    from policyserve.model.train import Trainer
    from policyserve.registry import get_embodiment_spec

    spec = get_embodiment_spec("franka_panda")
    episodes = make_episodes(spec.modality_configs, spec.dims.state, spec.dims.action, n_episodes=4, length=20,
                             image_hw=(image_size, image_size))
    trainer = Trainer(episodes, spec.modality_configs, directory / "train",
                      TrainConfig(max_steps=3, batch_size=4, progress=False, resume=False),
                      architecture={"image_size": image_size}, embodiment_tag="franka_panda")
    for _ in range(3):
        trainer.train_step()
    return save_checkpoint(directory / "ckpt", trainer.model, trainer.bundle)


GR00T_READY = r"listening on tcp://[\d.]+:(\d+)"
OPENPI_READY = r"openpi clients: listening on ws://[\d.]+:(\d+)"


def start_model_server(checkpoint: Path, *extra: str, ready: str = GR00T_READY) -> tuple[subprocess.Popen, int]:
    import re

    proc = subprocess.Popen([sys.executable, "-m", "policyserve", "serve", "--model-path", str(checkpoint),
                             "--port", "0", *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        match = re.search(ready, line)
        if match:
            return proc, int(match.group(1))
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError("model server did not start")


HEADER = (f"{'server':<34}{'req/s':>9}{'p50 ms':>10}{'p99 ms':>10}{'queue':>8}{'policy':>9}   "
          "merged batch sizes (count)   [queue/policy: median server_timing ms]")


def show(name: str, row: dict) -> None:
    split = (f"{row['queue_ms']:>8.1f}{row['policy_ms']:>9.1f}" if row.get("queue_ms") is not None
             else f"{'-':>8}{'-':>9}")
    print(f"{name:<34}{row['req_per_s']:>9.1f}{row['p50_ms']:>10.1f}{row['p99_ms']:>10.1f}{split}   "
          f"{row['merged'] or '-'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--image-size", type=int, default=84)
    parser.add_argument("--no-openpi", action="store_true", help="skip (c), the openpi clients")
    args = parser.parse_args()

    print(f"{args.clients} client processes, closed loop, {args.seconds:.0f} s each run, B=1 per request")
    print(HEADER)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_checkpoint(Path(tmp), args.image_size)
        for name, extra in (("model, --max-batch-size 1", ("--max-batch-size", "1")),
                            ("model, continuous batching", ())):
            proc, port = start_model_server(checkpoint, *extra)
            try:
                rows[name] = run_clients("ours", port, args.clients, args.seconds, args.image_size)
            finally:
                proc.terminate()
                proc.wait(30)
            show(name, rows[name])
        if not args.no_openpi:
            openpi_rows(checkpoint, args, rows)
    for name, kind in (("synthetic 20ms+1ms/sample, upstream", "upstream"),
                       ("synthetic 20ms+1ms/sample, ours", "ours")):
        proc, port = start_synthetic(kind)
        try:
            rows[name] = run_clients(kind, port, args.clients, args.seconds, args.image_size)
        finally:
            proc.terminate()
            proc.join(30)
        show(name, rows[name])
    model = rows["model, continuous batching"]["req_per_s"] / rows["model, --max-batch-size 1"]["req_per_s"]
    synthetic = (rows["synthetic 20ms+1ms/sample, ours"]["req_per_s"]
                 / rows["synthetic 20ms+1ms/sample, upstream"]["req_per_s"])
    print(f"\nmodel: batching / --max-batch-size 1 = {model:.2f}x throughput (goal >= 3x)")
    print(f"synthetic: ours / upstream serial = {synthetic:.2f}x throughput (goal >= 5x)")
    if "model, openpi door" in rows:
        door, gr00t = rows["model, openpi door"]["req_per_s"], rows["model, continuous batching"]["req_per_s"]
        print(f"openpi: our openpi door / GR00T door = {door / gr00t:.2f}x throughput (goal >= 0.9x)")
        if "model, openpi's own server" in rows:
            theirs = rows["model, openpi's own server"]["req_per_s"]
            print(f"openpi: our openpi door / openpi's WebsocketPolicyServer = {door / theirs:.2f}x throughput "
                  "(goal >= 3x)")


def openpi_rows(checkpoint: Path, args: argparse.Namespace, rows: dict) -> None:
    """(c): the model to openpi clients, through our openpi door and through openpi's own server."""
    try:
        import openpi_client  # noqa: F401
    except ImportError:
        print("(openpi rows skipped: openpi-client is not installed; see scripts/install.sh)")
        return
    name = "model, openpi door"
    proc, port = start_model_server(checkpoint, "--protocol", "openpi", ready=OPENPI_READY)
    try:
        rows[name] = run_clients("openpi", port, args.clients, args.seconds, args.image_size)
    finally:
        proc.terminate()
        proc.wait(30)
    show(name, rows[name])
    try:
        import openpi_server  # noqa: F401
    except ImportError:
        print("(openpi's own server skipped: openpi-server is not installed; see scripts/install.sh)")
        return
    name = "model, openpi's own server"
    server, port = start_openpi_server(checkpoint)
    try:
        rows[name] = run_clients("openpi", port, args.clients, args.seconds, args.image_size)
    finally:
        server.terminate()
        server.join(30)
    show(name, rows[name])


if __name__ == "__main__":
    main()
