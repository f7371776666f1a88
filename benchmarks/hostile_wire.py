"""Figures for hostile input on the wire and for CurveZMQ's cost.

1. Decode bombs (16 MB by default) of several shapes through both codecs: time to refuse (or decode), and the
   tracemalloc peak relative to the message size; the GR00T pre-auth peek on an unauthenticated bomb.
2. Round trip of a get_action-shaped exchange (B=1 and B=32, franka-sized observation) through PolicyClient and
   a raw ZeroMQ ROUTER echo server, with and without CURVE.

    python benchmarks/hostile_wire.py [--size-mb 16] [--rounds 200]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zmq

from policyserve.client.policy_client import PolicyClient
from policyserve.errors import ProtocolError
from policyserve.security import curve_server, generate_keys
from policyserve.wire import gr00t, openpi


def tree(leaf: bytes, size: int, fan: int = 15) -> bytes:
    node = leaf
    while len(node) * fan < size:
        node = bytes([0x90 | fan]) + node * fan
    return bytes([0x90 | (size // len(node))]) + node * (size // len(node))


def npy_bomb(pack: Callable, size: int) -> bytes:
    leaves = b"".join(pack(np.zeros((0, i + 1), np.uint8)) for i in range(15))
    return tree(b"\x9f" + leaves, size)


def measure(decode: Callable[[bytes], object], data: bytes) -> tuple[float, float, str]:
    start = time.perf_counter()
    try:
        decode(data)
        outcome = "decoded"
    except ProtocolError as exc:
        outcome = "refused: " + str(exc)[:40]
    seconds = time.perf_counter() - start
    tracemalloc.start()
    try:
        decode(data)
    except ProtocolError:
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return seconds, peak / len(data), outcome


def bombs(size: int) -> None:
    shapes = {
        "empty arrays": lambda _: tree(b"\x90", size),
        "empty maps": lambda _: tree(b"\x80", size),
        "one-key maps": lambda _: tree(b"\x81\xa0\xc0", size, 5),
        "floats": lambda _: tree(b"\xcb" + bytes(8), size),
        "1-char strings": lambda _: tree(b"\xa1x", size),
        "tiny arrays": lambda pack: npy_bomb(pack, size),
    }
    print(f"decode bombs, about {size / 1e6:.0f} MB each (time to refuse, tracemalloc peak / message size)")
    print(f"{'shape':16s} {'gr00t ms':>9s} {'peak':>6s}  {'openpi ms':>9s} {'peak':>6s}  outcome")
    for name, make in shapes.items():
        g = measure(gr00t.unpackb, make(gr00t.packb))
        o = measure(openpi.unpackb, make(openpi.packb))
        print(f"{name:16s} {g[0] * 1e3:9.1f} {g[1]:5.2f}x  {o[0] * 1e3:9.1f} {o[1]:5.2f}x  {g[2]}")
    request = (b"\x83" + gr00t.packb("endpoint") + gr00t.packb("get_action") + gr00t.packb("data")
               + tree(b"\x90", size) + gr00t.packb("api_token") + gr00t.packb("wrong"))
    for label, token in (("wrong token", "secret"), ("right token", "wrong")):
        start = time.perf_counter()
        gr00t.peek_request(request, expected_token=token)
        print(f"peek_request on a {len(request) / 1e6:.0f} MB bomb, {label}: "
              f"{(time.perf_counter() - start) * 1e3:.2f} ms")


class EchoRouter:
    """A ROUTER answering every GR00T request with a fixed get_action reply (echoing the whole envelope)."""

    def __init__(self, reply: bytes, secret_key: Path | None, authorized: Path | None) -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.curve = curve_server(self.context, self.socket, secret_key, authorized) if secret_key else None
        self.port = self.socket.bind_to_random_port("tcp://127.0.0.1")
        self.reply = reply
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            if self.socket.poll(50):
                frames = self.socket.recv_multipart(copy=False)
                gr00t.unpackb(frames[-1].buffer)
                self.socket.send_multipart([*(f.bytes for f in frames[:-1]), self.reply], copy=False)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.socket.close(0)
        if self.curve:
            self.curve.stop()
        self.context.term()


def round_trips(rounds: int) -> None:
    folder = Path(tempfile.mkdtemp())
    server_public, server_secret = generate_keys(folder / "server", "server")
    client_public, client_secret = generate_keys(folder / "client", "client")
    authorized = folder / "authorized"
    authorized.mkdir()
    (authorized / "client.key").write_bytes(client_public.read_bytes())
    print(f"\nget_action round trip through PolicyClient and a raw ROUTER, {rounds} rounds (p50 / p99 ms)")
    for batch in (1, 32):
        obs = {"video": {"cam": np.zeros((batch, 1, 84, 84, 3), np.uint8)},
               "state": {"eef": np.zeros((batch, 1, 9), np.float32)}, "language": {"task": [["lift"]] * batch}}
        reply = gr00t.packb([{"arm": np.zeros((batch, 16, 7), np.float32)}, {}])
        for label, curve in (("plain", False), ("CURVE", True)):
            server = EchoRouter(reply, server_secret if curve else None, authorized if curve else None)
            options = {"curve_server_key": server_public, "curve_key_pair": client_secret} if curve else {}
            client = PolicyClient("127.0.0.1", server.port, timeout_ms=5000, **options)
            try:
                for _ in range(10):
                    client.get_action(obs)
                times = []
                for _ in range(rounds):
                    start = time.perf_counter()
                    client.get_action(obs)
                    times.append((time.perf_counter() - start) * 1e3)
            finally:
                client.close()
                server.close()
            times.sort()
            size = len(gr00t.packb({"endpoint": "get_action", "data": {"observation": obs, "options": None}}))
            print(f"B={batch:<3d} {label:6s} request {size / 1e3:7.1f} kB  p50 {statistics.median(times):6.2f}  "
                  f"p99 {times[int(0.99 * (len(times) - 1))]:6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=float, default=16)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    bombs(int(args.size_mb * (1 << 20)))
    round_trips(args.rounds)


if __name__ == "__main__":
    main()
