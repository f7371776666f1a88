"""Round-trip latency of get_action through our client+server vs the upstream scheme and raw ZeroMQ.

Baseline (GR00T N1.6): np.save inside msgpack over plain REQ/REP, np.load on decode
(tests/upstream_gr00t.py). Ours: PolicyClient + PolicyServer (ROUTER front door, scheduler worker,
zero-copy codec, writable arrays for the policy). Raw: the same request and reply bytes over a
REQ/ROUTER loopback pair, no encoding, no policy. All serve the same no-op (constant) policy.
Observation: two 224x224x3 uint8 cameras + a 7-d state + a task string, for B=1 and B=32.

Then where our time goes: encode request, decode request (from a received frame), validation,
policy, encode reply, decode reply, each timed alone; "rest" is the round trip minus raw transfer
minus those (thread hand-offs and scheduling).

    python benchmarks/protocol.py [--iters N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from policyserve import ModalityConfig, PolicyClient, PolicyServer  # noqa: E402
from policyserve.policies.constant import ConstantPolicy  # noqa: E402
from policyserve.wire.gr00t import packb, unpackb  # noqa: E402
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


class RawPair:
    """REQ -> ROUTER over loopback answering fixed reply bytes: the transport alone."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.req = self.ctx.socket(zmq.REQ)
        self.req.connect(f"tcp://127.0.0.1:{port}")

    def round_trip(self, request: bytes, reply: bytes) -> None:
        self.req.send(request, copy=False)
        frames = self.router.recv_multipart(copy=False)
        self.router.send_multipart([frames[0], b"", reply], copy=False)
        self.req.recv(copy=False)

    def close(self) -> None:
        self.req.close(0)
        self.router.close(0)
        self.ctx.term()


def received_frame(data: bytes) -> zmq.Frame:
    """``data`` as the server receives it: a ZeroMQ frame (writable, zero-copy)."""
    return zmq.Frame(bytearray(data))


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
    raw = RawPair()

    rows = []
    print(f"{'batch':>5} {'payload MB':>10} {'raw med ms':>10} {'upstream med/p90 ms':>20} {'ours med/p90 ms':>16} "
          f"{'ours/upstream':>13} {'ours/raw':>8}")
    for batch in (1, 32):
        obs = observation(batch)
        payload_mb = sum(v.nbytes for v in obs["video"].values()) / 1e6
        request = {"endpoint": "get_action", "data": {"observation": obs, "options": None}}
        action, info = ours.get_action(obs)
        reply_obj = [action, info]
        request_bytes, reply_bytes = packb(request), packb(reply_obj)
        base = summary(measure(lambda: upstream.call_endpoint("get_action", {"observation": obs, "options": None}),
                               args.iters))
        mine = summary(measure(lambda: ours.get_action(obs), args.iters))
        transport = summary(measure(lambda: raw.round_trip(request_bytes, reply_bytes), args.iters))
        print(f"{batch:>5} {payload_mb:>10.1f} {transport[0]:>10.2f} {base[0]:>9.2f}/{base[1]:<9.2f} "
              f"{mine[0]:>7.2f}/{mine[1]:<8.2f} {mine[0] / base[0]:>12.2f}x {mine[0] / transport[0]:>7.1f}x")
        frame = received_frame(request_bytes)
        decoded = unpackb(frame.buffer)["data"]["observation"]
        parts = {
            "encode request": summary(measure(lambda: packb(request), args.iters))[0],
            "decode request": summary(measure(lambda: unpackb(received_frame(request_bytes).buffer),
                                              args.iters))[0],
            "validation": summary(measure(lambda: policy.check_observation(decoded), args.iters))[0],
            "policy": summary(measure(lambda: policy._get_action(decoded, None), args.iters))[0],
            "encode reply": summary(measure(lambda: packb(reply_obj), args.iters))[0],
            "decode reply": summary(measure(lambda: unpackb(received_frame(reply_bytes).buffer), args.iters))[0],
        }
        # received_frame copies the bytes into a new buffer: time that copy alone and take it out again.
        frame_copy = summary(measure(lambda: received_frame(request_bytes), args.iters))[0]
        frame_copy_reply = summary(measure(lambda: received_frame(reply_bytes), args.iters))[0]
        parts["decode request"] = max(0.0, parts["decode request"] - frame_copy)
        parts["decode reply"] = max(0.0, parts["decode reply"] - frame_copy_reply)
        copying = summary(measure(lambda: unpackb(request_bytes, writable=True), args.iters))[0]
        print(f"      writable arrays: decode with zero-copy writable views {parts['decode request']:.3f} ms, "
              f"with copied arrays {copying:.3f} ms")
        parts["raw transfer"] = transport[0]
        parts["rest (hand-offs, scheduling)"] = mine[0] - sum(parts.values())
        rows.append((batch, parts))
    print("\nwhere our round trip goes (median ms, each part timed alone):")
    names = list(rows[0][1])
    print(f"{'part':<30}" + "".join(f"{'B=' + str(b):>10}" for b, _ in rows))
    for name in names:
        print(f"{name:<30}" + "".join(f"{parts[name]:>10.3f}" for _, parts in rows))
    ours.kill_server()
    ours.close()
    upstream.close()
    upstream_server.stop()
    raw.close()


if __name__ == "__main__":
    main()
