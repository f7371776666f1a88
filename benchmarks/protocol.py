"""Round-trip latency of get_action through our client+server vs the upstream scheme.

Baseline (GR00T N1.6): np.save inside msgpack over plain REQ/REP, np.load on decode
(tests/upstream_gr00t.py). Ours: PolicyClient + PolicyServer (ROUTER, NPY header parsed directly,
read-only views on the server). Both serve a no-op policy. Observation: two 224x224x3 uint8
cameras + a 7-d state + a task string, for B=1 and B=32.

    python benchmarks/protocol.py [--iters N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from policyserve import ModalityConfig, PolicyClient, PolicyServer  # noqa: E402
from policyserve.policies.constant import ConstantPolicy  # noqa: E402
from policyserve.types import ModalityDims  # noqa: E402
from upstream_gr00t import UpstreamClient, UpstreamServer  # noqa: E402

CONFIGS = {
    "video": ModalityConfig([0], ["ego_view", "wrist_view"]),
    "state": ModalityConfig([0], ["joints"]),
    "action": ModalityConfig(list(range(16)), ["joints"]),
    "language": ModalityConfig([0], ["task"]),
}
DIMS = ModalityDims(state={"joints": 7}, action={"joints": 7})


def observation(batch: int) -> dict:
    rng = np.random.default_rng(0)
    return {
        "video": {k: rng.integers(0, 255, (batch, 1, 224, 224, 3), dtype=np.uint8) for k in ("ego_view", "wrist_view")},
        "state": {"joints": rng.standard_normal((batch, 1, 7)).astype(np.float32)},
        "language": {"task": [["stack the red cube on the green cube"]] * batch},
    }


def measure(call, iters: int) -> list[float]:
    for _ in range(3):
        call()
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def summary(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[int(0.9 * (len(ordered) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()

    policy = ConstantPolicy(CONFIGS, DIMS, strict=True)
    ours_server = PolicyServer(policy, port=0, verbose=False)
    ours_server.start()
    ours = PolicyClient(host="127.0.0.1", port=ours_server.port, timeout_ms=30000)

    def upstream_get_action(observation, options=None):
        action, info = policy.get_action(observation, options)
        return [action, info]

    upstream_server = UpstreamServer({"get_action": upstream_get_action}).start()
    upstream = UpstreamClient(upstream_server.port, timeout_ms=30000)

    print(f"{'batch':>5} {'payload MB':>10} {'upstream med/p90 ms':>20} {'ours med/p90 ms':>16} {'speedup':>8}")
    for batch in (1, 32):
        obs = observation(batch)
        payload_mb = sum(v.nbytes for v in obs["video"].values()) / 1e6
        base = summary(measure(lambda: upstream.call_endpoint("get_action", {"observation": obs, "options": None}),
                               args.iters))
        mine = summary(measure(lambda: ours.get_action(obs), args.iters))
        print(f"{batch:>5} {payload_mb:>10.1f} {base[0]:>9.2f}/{base[1]:<9.2f} {mine[0]:>7.2f}/{mine[1]:<8.2f} "
              f"{base[0] / mine[0]:>7.2f}x")
    ours.kill_server()
    ours.close()
    upstream.close()
    upstream_server.stop()


if __name__ == "__main__":
    main()
