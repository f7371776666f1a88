"""Soak test (not in CI): mixed clients against one ``policyserve serve`` process for N minutes.

Clients, each its own process: REQ clients in a closed get_action loop (some with per-request seeds,
some sending resets), a pipelining DEALER that floods past its queue limit, a client that times out
and reconnects, and a pinger. Every request is counted until answered; the server's RSS is sampled
every few seconds. Prints the RSS trend (start, peak, end, slope) and any request left unanswered.

    python benchmarks/soak.py [--minutes 2] [--clients 6]
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
    from policyserve.wire.gr00t import packb, unpackb

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{port}")
    body = packb({"endpoint": "get_action", "data": {"observation": franka_observation(size=64), "options": None}})
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
    sock.close(0)
    ctx.term()
    out.put(("flooder", sent, answered, busy))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--clients", type=int, default=6)
    args = parser.parse_args()
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
