"""Soak test (not in CI): mixed clients against one ``policyserve serve`` process for N minutes.

Clients, each its own process: REQ clients in a closed get_action loop (some with per-request seeds,
some sending resets), a pipelining DEALER that floods past its queue limit, a client that times out
and reconnects, and a pinger. Every request is counted until answered; the server's RSS is sampled
every few seconds. Prints the RSS trend (start, peak, end, slope) and any request left unanswered.

    python benchmarks/soak.py [--minutes 2] [--clients 6]

``--hostile`` (issue 17): the server runs with an API token, an openpi door and metrics, its log goes to a
file; well-behaved REQ clients first run alone (``--solo-seconds``) for their solo latency, then alongside
every hostile kind: 16 MB decode bombs without and with the token, a client that never reads its replies,
a flooder, requests with too many rows, unknown-endpoint spam with forged log lines, connection churn and
idle TCP connections on every port. The hostile processes run at ``--hostile-nice`` (default 10): on this
one machine their own CPU would otherwise count against the clients that measure, while the server's work
for them counts either way. Prints the well-behaved p50/p99 against solo, the server's RSS trend,
its log size, and any well-behaved request left unanswered.

    python benchmarks/soak.py --hostile [--minutes 1] [--clients 4]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def well_behaved(port: int, start: float, until: float, seed: int, token: str, out) -> None:
    """A closed-loop get_action client; reports its latencies (s) and requests left unanswered."""
    from helpers import franka_observation
    from policyserve import PolicyClient
    from policyserve.errors import PolicyServeError

    obs = franka_observation(batch=1 + seed % 2, size=64)
    latencies, failed = [], []
    client = PolicyClient(host="127.0.0.1", port=port, timeout_ms=20000, api_token=token)
    while time.time() < start:
        time.sleep(0.01)
    while time.time() < until:
        t = time.perf_counter()
        try:
            client.get_action(obs)
            latencies.append(time.perf_counter() - t)
        except PolicyServeError as exc:
            failed.append(str(exc)[:200])
    client.close()
    out.put(("well-behaved", latencies, failed))


def hostile(kind: str, ports: dict, until: float, token: str, out, nice: int = 0) -> None:
    """One hostile client of ``kind`` until ``until``, at OS priority ``nice``; reports (kind, sent, answered, note)."""
    import os
    import socket

    import msgpack
    import numpy as np
    import zmq

    from helpers import franka_observation
    from policyserve import PolicyClient
    from policyserve.wire.gr00t import packb, unpackb

    os.nice(nice)  # an attacker's own CPU is its machine's, not the server's (see --hostile-nice)
    port = ports["gr00t"]
    ctx = zmq.Context()
    sent = answered = 0
    note = ""

    def dealer(**options: int) -> zmq.Socket:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        for name, value in options.items():
            sock.setsockopt(getattr(zmq, name), value)
        sock.connect(f"tcp://127.0.0.1:{port}")
        return sock

    def ask(body: bytes, timeout_ms: int = 30000) -> object:
        nonlocal sent, answered
        sock = dealer()
        sent += 1
        sock.send(body, copy=False)
        reply = unpackb(sock.recv()) if sock.poll(timeout_ms) else None
        answered += reply is not None
        sock.close(0)
        return reply

    size = 16 << 20
    bomb = b"\xdd" + (size - 5).to_bytes(4, "big") + b"\x90" * (size - 5)
    head = msgpack.packb("endpoint") + msgpack.packb("get_action") + msgpack.packb("data")
    times: list[float] = []
    setups: list[float] = []
    if kind in ("bomb-no-token", "bomb-token"):
        body = (b"\x82" + head + bomb if kind == "bomb-no-token"
                else b"\x83" + head + bomb + msgpack.packb("api_token") + msgpack.packb(token))
        # One connection for all bombs, so a time is the message's own (send -> refusal); the time of a fresh
        # connection's first exchange (connect + handshake + the same message) is reported beside it.
        while time.time() < until:
            t = time.perf_counter()
            ask(body)
            setups.append(time.perf_counter() - t)
            if len(setups) >= 3:
                break
            time.sleep(0.5)
        sock = dealer()
        while time.time() < until:
            t = time.perf_counter()
            sock.send(body, copy=False)
            sent += 1
            if sock.poll(30000):
                sock.recv()
                answered += 1
                times.append(time.perf_counter() - t)
            time.sleep(1.0 if kind == "bomb-no-token" else 2.0)
        sock.close(0)
        times_ms = sorted(t * 1000 for t in times) or [float("nan")]
        note = (f"send->reply median {times_ms[len(times_ms) // 2]:.0f} ms, max {times_ms[-1]:.0f} ms "
                f"({len(times)} on one connection); on a fresh connection max {max(setups) * 1000:.0f} ms")
    elif kind == "non-reader":
        sock = dealer(RCVHWM=1, RCVBUF=4096)
        body = packb({"endpoint": "get_action", "api_token": token,
                      "data": {"observation": franka_observation(batch=64, size=8)}})
        while time.time() < until:
            sock.send(body)
            sent += 1
            time.sleep(0.01)
        note = "never reads"
        sock.close(0)
    elif kind == "flooder":
        sock = dealer()
        body = packb({"endpoint": "get_action", "api_token": token,
                      "data": {"observation": franka_observation(size=64)}})
        sent, answered, busy = flood(sock, body, until)
        note = f"busy {busy}"
        sock.close(0)
    elif kind == "huge-batch":
        body = packb({"endpoint": "get_action", "api_token": token,
                      "data": {"observation": franka_observation(batch=2000, size=4)}})
        refused = 0
        while time.time() < until:
            reply = ask(body)
            refused += isinstance(reply, dict) and "max_request_batch" in reply.get("error", "")
            time.sleep(0.5)
        note = f"refused naming max_request_batch: {refused}"
    elif kind == "unknown-endpoints":
        sock = dealer()
        body = packb({"endpoint": "\x1b[31mx\nFORGED line\r" * 200, "api_token": token})
        while time.time() < until:
            for _ in range(100):
                sock.send(body)
                sent += 1
            for _ in range(100):
                if sock.poll(10000):
                    sock.recv()
                    answered += 1
        sock.close(0)
    elif kind == "churn":
        while time.time() < until:
            with PolicyClient(port=port, timeout_ms=10000, api_token=token) as client:
                sent += 1
                answered += bool(client.ping())
    elif kind == "idle":
        held = []
        for name, p in ports.items():
            for _ in range(300):
                try:
                    held.append(socket.create_connection(("127.0.0.1", p), timeout=5))
                except OSError as exc:
                    note = f"{name}: {exc}"
                    break
        sent = len(held)
        while time.time() < until:
            time.sleep(0.5)
        answered = sent
        note = note or f"{len(held)} idle connections on {', '.join(ports)}"
        for sock in held:
            sock.close()
    ctx.term()
    out.put((kind, sent, answered, note))


HOSTILE_KINDS = ["bomb-no-token", "bomb-token", "non-reader", "flooder", "huge-batch", "unknown-endpoints", "churn",
                 "idle"]


def hostile_main(args: argparse.Namespace) -> None:
    import numpy as np

    token = "soak-token"
    ports = {"gr00t": 0, "openpi": free_port(), "metrics": free_port()}
    log_path = Path(args.log or "/tmp/policyserve-soak-hostile.log")
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "policyserve", "serve", "--port", "0", "--api-token", token,
             "--openpi-port", str(ports["openpi"]), "--metrics-port", str(ports["metrics"])],
            stdout=log, stderr=subprocess.STDOUT, env={**__import__("os").environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    while (match := re.search(r"listening on tcp://[\d.]+:(\d+)", log_path.read_text())) is None:
        if server.poll() is not None or time.time() > deadline:
            server.kill()
            raise SystemExit("server did not start:\n" + log_path.read_text())
        time.sleep(0.1)
    ports["gr00t"] = int(match.group(1))
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    samples: list[tuple[float, float]] = []

    def phase(seconds: float, kinds: list[str]) -> list:
        start = time.time() + 3.0  # clients connect first
        until = start + seconds
        procs = [ctx.Process(target=well_behaved, args=(ports["gr00t"], start, until, i, token, out))
                 for i in range(args.clients)]
        procs += [ctx.Process(target=hostile, args=(kind, ports, until, token, out, args.hostile_nice))
                  for kind in kinds]
        for p in procs:
            p.start()
        while time.time() < until:
            samples.append((time.time(), rss_mib(server.pid)))
            time.sleep(2)
        results = [out.get(timeout=180) for _ in procs]
        for p in procs:
            p.join(30)
        return results

    solo = phase(args.solo_seconds, [])
    t_hostile = time.time()
    kinds = args.kinds.split(",") if args.kinds else HOSTILE_KINDS
    mixed = phase(args.minutes * 60, kinds)
    samples.append((time.time(), rss_mib(server.pid)))
    server.terminate()
    code = server.wait(60)
    log_size = log_path.stat().st_size
    text = log_path.read_text()

    def latencies(results: list) -> tuple[np.ndarray, list]:
        lat = [x for r in results if r[0] == "well-behaved" for x in r[1]]
        failed = [x for r in results if r[0] == "well-behaved" for x in r[2]]
        return np.array(lat) * 1000, failed

    solo_ms, solo_failed = latencies(solo)
    mixed_ms, mixed_failed = latencies(mixed)
    hs = [(t, r) for t, r in samples if t >= t_hostile]
    t0, t1 = hs[0][0], hs[-1][0]
    second = [(t, r) for t, r in hs if t >= (t0 + t1) / 2]
    # least-squares slope over the second half (single samples jump by a bomb's 16 MB in flight)
    slope = float(np.polyfit([t for t, _ in second], [r for _, r in second], 1)[0] * 60) if len(second) > 2 else 0.0
    print(f"soak --hostile: {args.minutes} min hostile (+{args.solo_seconds} s solo), {args.clients} well-behaved "
          f"clients, hostile kinds: {', '.join(kinds)}; hostile processes at nice {args.hostile_nice}")
    print(f"well-behaved get_action ms: solo p50 {np.percentile(solo_ms, 50):.1f} p99 {np.percentile(solo_ms, 99):.1f} "
          f"(n={len(solo_ms)}); under attack p50 {np.percentile(mixed_ms, 50):.1f} p99 "
          f"{np.percentile(mixed_ms, 99):.1f} (n={len(mixed_ms)}); p99 ratio "
          f"{np.percentile(mixed_ms, 99) / np.percentile(solo_ms, 99):.2f}x (goal <= 3x)")
    print(f"server RSS MiB: start {hs[0][1]:.0f}, peak {max(r for _, r in hs):.0f}, end {hs[-1][1]:.0f}; "
          f"second half {min(r for _, r in second):.0f}..{max(r for _, r in second):.0f}, least-squares slope "
          f"{slope:+.1f} MiB/min")
    print("RSS samples:", " ".join(f"{r:.0f}" for _, r in hs))
    print(f"server log: {log_size} bytes ({log_path}); lines starting 'FORGED': "
          f"{sum(line.startswith('FORGED') for line in text.splitlines())}; tracebacks: {text.count('Traceback')}")
    for kind, sent, answered, note in (r for r in mixed if r[0] != "well-behaved"):
        print(f"  {kind:<18} sent {sent:>7} answered {answered:>7}  {note}")
    print(f"well-behaved requests failed: solo {len(solo_failed)}, under attack {len(mixed_failed)} "
          f"{mixed_failed[:3]}; unanswered: 0 by construction (each failure above is counted); "
          f"server exit code {code}")


def req_client(kind: str, port: int, until: float, seed: int, out) -> None:
    import zmq

    from helpers import franka_observation
    from policyserve import PolicyClient
    from policyserve.errors import PolicyTimeoutError, ServerError

    obs = franka_observation(batch=1 + seed % 4, size=64)
    sent = answered = errors = 0
    client = PolicyClient(host="127.0.0.1", port=port, timeout_ms=20000)
    while time.time() < until:
        sent += 1
        try:
            if kind == "pinger":
                client.ping()
            elif kind == "resetter" and sent % 5 == 0:
                client.reset({"episode_index": sent})
            elif kind == "impatient" and sent % 7 == 0:
                client.timeout_ms = 1  # times out, the socket is replaced, the next call works
                try:
                    client.get_action(obs)
                except PolicyTimeoutError:
                    pass
                client.timeout_ms = 20000
            else:
                client._get_action(obs, {"seed": sent} if kind == "seeded" else None)
            answered += 1
        except ServerError:
            answered += 1
            errors += 1
        except PolicyTimeoutError:
            pass
        except zmq.ZMQError:
            pass
    client.close()
    out.put((kind, sent, answered, errors))


def flooder(port: int, until: float, out) -> None:
    import zmq

    from helpers import franka_observation
    from policyserve.wire.gr00t import packb

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{port}")
    body = packb({"endpoint": "get_action", "data": {"observation": franka_observation(size=64), "options": None}})
    sent, answered, busy = flood(sock, body, until)
    sock.close(0)
    ctx.term()
    out.put(("flooder", sent, answered, busy))


def flood(sock, body: bytes, until: float) -> tuple[int, int, int]:
    """Send ``body`` in bursts of 200 on a DEALER until ``until``, reading the replies after each burst
    (30 s at most); returns (sent, answered, answered "server busy")."""
    from policyserve.wire.gr00t import unpackb

    sent = answered = busy = 0
    while time.time() < until:
        for _ in range(200):
            sock.send(body)
            sent += 1
        deadline = time.time() + 30
        while answered < sent and time.time() < deadline:
            if sock.poll(1000):
                reply = unpackb(sock.recv())
                answered += 1
                busy += isinstance(reply, dict) and "server busy" in reply.get("error", "")
    return sent, answered, busy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--hostile", action="store_true", help="well-behaved clients alongside hostile ones")
    parser.add_argument("--solo-seconds", type=float, default=15.0, help="--hostile: well-behaved alone first")
    parser.add_argument("--hostile-nice", type=int, default=10,
                        help="--hostile: OS niceness of the hostile client processes. On one machine their own CPU "
                             "competes with the server and the measuring clients; in a real attack it is on other "
                             "machines. The server's work for them counts either way; 0 measures them at equal "
                             "priority")
    parser.add_argument("--log", default=None, help="--hostile: server log file")
    parser.add_argument("--kinds", default=None, help="--hostile: comma-separated subset of hostile kinds "
                                                      "(default: all)")
    args = parser.parse_args()
    if args.hostile:
        hostile_main(args)
        return
    server = subprocess.Popen([sys.executable, "-m", "policyserve", "serve", "--port", "0",
                               "--max-queued-per-client", "32"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    port = None
    for _ in range(200):
        match = re.search(r"listening on tcp://[\d.]+:(\d+)", server.stdout.readline())
        if match:
            port = int(match.group(1))
            break
    if port is None:
        server.kill()
        raise SystemExit("server did not start")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    until = time.time() + args.minutes * 60
    kinds = ["plain", "seeded", "resetter", "impatient", "pinger", "plain"] * (args.clients // 6 + 1)
    procs = [ctx.Process(target=req_client, args=(kind, port, until, i, out))
             for i, kind in enumerate(kinds[: args.clients])]
    procs.append(ctx.Process(target=flooder, args=(port, until, out)))
    for p in procs:
        p.start()
    samples = []
    while time.time() < until:
        samples.append((time.time(), rss_mib(server.pid)))
        time.sleep(5)
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    samples.append((time.time(), rss_mib(server.pid)))
    server.terminate()
    code = server.wait(30)
    log = server.stdout.read()

    t0 = samples[0][0]
    half = [r for t, r in samples if t - t0 >= (samples[-1][0] - t0) / 2]
    slope = (samples[-1][1] - half[0]) / max(1e-9, (samples[-1][0] - t0) / 2) * 60
    print(f"soak: {args.minutes} min, {len(procs)} client processes, server pid {server.pid}")
    print(f"server RSS MiB: start {samples[0][1]:.0f}, peak {max(r for _, r in samples):.0f}, "
          f"end {samples[-1][1]:.0f}; second-half slope {slope:+.1f} MiB/min")
    print("RSS samples:", " ".join(f"{r:.0f}" for _, r in samples))
    unanswered = 0
    for kind, sent, answered, extra in results:
        lost = sent - answered
        unanswered += lost
        label = "busy" if kind == "flooder" else "errors"
        print(f"  {kind:<10} sent {sent:>7} answered {answered:>7} {label} {extra:>6}"
              + (f"  UNANSWERED {lost}" if lost else ""))
    print(f"unanswered requests: {unanswered}; server exit code {code}; "
          f"tracebacks in server log: {log.count('Traceback')}")


if __name__ == "__main__":
    main()
