"""Run every code block of README.md, in order, at reduced sizes, in a temporary folder.

Fails on the first block that does not do what the README says: a command that exits non-zero, a server
that does not come up or answer a ping, a Python snippet that raises, a JSON block that does not parse or
is refused where it is used, a metric or file the README names that does not exist.

- bash blocks: each command runs with ``bash -c`` in the work folder (``ray start``, which needs a cluster
  of several machines, is reported and skipped, and ``--ray-address`` commands run on a local Ray instance;
  the tests join a real two-node Ray cluster on loopback). ``policyserve serve`` lines start a
  server and wait until it listens (and answers a ping on a GR00T port); with a trailing ``&`` it keeps
  running until the end of the block, otherwise it is stopped once checked. Sizes are reduced (demos,
  episodes, training steps, benchmark lengths); placeholders (``DATASET``, ``OUT/checkpoint-2000``) get
  real fixtures. The install script and the test suite (``.ci/run`` runs both) are not run again.
- python blocks: run as scripts; a built-in server is started on the GR00T (and openpi) port they use.
- json blocks: parsed, then used: a column map with ``convert``, an openpi key map with ``serve``.
- the Prometheus sample: every metric it shows is in a real scrape. The layout tree: every file it names
  exists.

    python3 scripts/readme_check.py [--keep] [--timeout S]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
GR00T_READY = re.compile(r"Server is ready and listening on tcp://[\d.]+:(\d+)")
OPENPI_READY = re.compile(r"openpi clients: listening on ws://")

REDUCE = [  # (pattern, replacement): applied to every command and snippet
    (r"--n-demos \d+", "--n-demos 2"),
    (r"--max-steps \d+", "--max-steps 4"),
    (r"--save-steps \d+", "--save-steps 2"),
    (r"--n-episodes \d+", "--n-episodes 2"),
    (r"--max-episode-steps \d+", "--max-episode-steps 40"),
    (r"--minutes \d+", "--minutes 0.1"),
    (r"range\(1000\)", "range(30)"),
    (r"--workers \d+", "--workers 2"),
    (r"--replicas \d+", "--replicas 2"),
    (r"POLICY_HOST", "127.0.0.1"),
    (r"--host 0\.0\.0\.0", "--host 127.0.0.1"),  # the check sends traffic to loopback only
    (r" --replica-gpus \d+ --device cuda", ""),  # no GPU here: the same command on CPUs
    (r"/shared/ckpt", "OUT/checkpoint-2000"),
]
BENCHMARK_ARGS = {  # reduced sizes for each benchmark script
    "protocol.py": "--iters 5", "serving.py": "--seconds 1 --clients 2 --image-size 32",
    "soak.py": "--clients 2", "replay.py": "--calls 50 --demos 1 --length 20 --image-size 32",
    "model.py": "--reps 1 --train-steps 1 --batch-sizes 1 --image-size 32 --train-batch-size 4",
    "sim.py": "--steps 4 --size 32", "rollout.py": "--episodes 1 --steps 8 --repeats 1 --camera-size 32",
    "sim_observe.py": "--steps 5 --size 32", "scale.py": "--quick",
}
DEMO_ARGS = "--n-demos 1 --model-steps 2 --eval-episodes 1 --max-episode-steps 60 --quiet"


class CheckFailed(Exception):
    pass


@dataclass
class Block:
    line: int
    lang: str
    text: str
    section: str


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def blocks(readme: Path) -> list[Block]:
    found, section, lines = [], "", readme.read_text().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("#"):
            section = lines[i].lstrip("#").strip()
        if lines[i].startswith("```"):
            lang, start, body = lines[i][3:].strip(), i + 1, []
            i += 1
            while not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            found.append(Block(start, lang, "\n".join(body) + "\n", section))
        i += 1
    return found


def reduce(text: str) -> str:
    for pattern, replacement in REDUCE:
        text = re.sub(pattern, replacement, text)
    text = text.replace("../shared/", f"{SHARED}/")
    text = re.sub(r"(?<![\w/])(benchmarks|scripts)/", lambda m: f"{ROOT}/{m.group(1)}/", text)
    return text


def commands(text: str) -> list[str]:
    """Shell commands of a bash block: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


class Checker:
    def __init__(self, work: Path, timeout: float) -> None:
        self.work, self.timeout = work, timeout
        self.background: list[subprocess.Popen] = []
        self.env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl"), "PYTHONUNBUFFERED": "1"}

    # -- processes -----------------------------------------------------------------------------------
    def run(self, command: str, what: str, timeout: float | None = None) -> str:
        began = time.monotonic()
        done = subprocess.run(["bash", "-c", command], cwd=self.work, env=self.env, capture_output=True, text=True,
                              timeout=timeout or self.timeout)
        if time.monotonic() - began > 20:
            print(f"    ({time.monotonic() - began:.0f} s: {command[:90]})", flush=True)
        if done.returncode != 0:
            raise CheckFailed(f"{what}: exit code {done.returncode}\n$ {command}\n{(done.stdout + done.stderr)[-3000:]}")
        return done.stdout

    def start_server(self, command: str, what: str) -> subprocess.Popen:
        proc = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=self.work, env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.background.append(proc)
        lines: queue.Queue[str | None] = queue.Queue()

        def read() -> None:  # the whole output, so the server never blocks on a full pipe
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=read, daemon=True).start()
        ready = OPENPI_READY if "--protocol openpi" in command else GR00T_READY
        deadline, seen = time.monotonic() + 180, []
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            seen.append(line)
            match = ready.search(line)
            if match:
                if ready is GR00T_READY:
                    self.ping(int(match.group(1)), what)
                return proc
        self.stop(proc)
        raise CheckFailed(f"{what}: the server did not start\n$ {command}\n{''.join(seen)[-3000:]}")

    def ping(self, port: int, what: str) -> None:
        from policyserve import PolicyClient

        with PolicyClient(host="127.0.0.1", port=port, timeout_ms=10000) as client:
            if not client.ping():
                raise CheckFailed(f"{what}: the server on port {port} does not answer a ping")

    def stop(self, proc: subprocess.Popen) -> None:
        """Stop the server and anything else in its process group (bounded waits)."""
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _group_alive(proc.pid):
                proc.poll()  # reap the leader, or its zombie keeps the group alive
                time.sleep(0.1)
            if not _group_alive(proc.pid):
                break
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        if proc in self.background:
            self.background.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self.background):
            self.stop(proc)

    # -- fixtures ------------------------------------------------------------------------------------
    def fixture_checkpoint(self) -> None:
        if (self.work / "OUT" / "checkpoint-2000" / "config.json").is_file():
            return
        self.run("python3 -m policyserve record --task lift --n-demos 2 --output fixture.hdf5 --camera-size 32 && "
                 "python3 -m policyserve convert hdf5-to-lerobot --input fixture.hdf5 --output fixture_lerobot && "
                 "python3 -m policyserve train --dataset-path fixture_lerobot --output-dir OUT/checkpoint-2000 "
                 "--embodiment-tag franka_panda --image-size 32 --max-steps 2 --batch-size 2 --no-progress",
                 "fixture checkpoint for OUT/checkpoint-2000")

    # -- blocks --------------------------------------------------------------------------------------
    def bash(self, block: Block) -> None:
        try:
            for command in commands(reduce(block.text)):
                self.command(command, f"README line {block.line} ({block.section})")
        finally:
            self.stop_all()

    def command(self, command: str, what: str) -> None:
        if "&&" in command:
            for part in command.split("&&"):
                self.command(part.strip(), what)
            return
        if re.match(rf"(bash \S*scripts/install\.sh|python3 -m pytest|pip install)\b", command):
            print(f"  skip (.ci/run does it): {command.split('#')[0].strip()}")
            return
        if re.match(r"ray start\b", command):
            print(f"  skip: {command.split('#')[0].strip()}: a Ray cluster of several machines (tests/ray_*_cases.py "
                  "join a real two-node cluster on loopback with --ray-address)")
            return
        if "--ray-address" in command:  # the same command on a local Ray instance
            command = re.sub(r"\s--ray-address\s+\S+", "", command)
        if "DATASET" in command:
            command = command.replace("DATASET", f"{SHARED}/datasets/gr1.PickNPlace")
        if "OUT/checkpoint-2000" in command:
            self.fixture_checkpoint()
        command = re.sub(r"\s+#.*$", "", command)
        keep = command.endswith("&")
        command = command.rstrip("&").strip()
        if re.match(r"python3 -m policyserve demo\b", command):
            command += " " + DEMO_ARGS
        for name, args in BENCHMARK_ARGS.items():
            if re.match(rf"python3 \S*benchmarks/{re.escape(name)}\b", command):
                command += " " + args
        print(f"  $ {command}{' &' if keep else ''}")
        command = re.sub(r"^policyserve ", "python3 -m policyserve ", command)
        if re.match(r"python3 -m policyserve serve\b", command):
            proc = self.start_server(command, what)
            if not keep:
                self.stop(proc)
            return
        self.run(command, what)

    def python(self, block: Block) -> None:
        what = f"README line {block.line} ({block.section})"
        code = reduce(block.text)
        try:
            if re.search(r"WebsocketClientPolicy\(\"127\.0\.0\.1\", (\d+)", code):
                port = re.search(r"WebsocketClientPolicy\(\"127\.0\.0\.1\", (\d+)", code).group(1)
                self.start_server(f"python3 -m policyserve serve --port 0 --openpi-port {port}", what)
            elif re.search(r"(port=|\", )5555\b", code):
                self.start_server("python3 -m policyserve serve --port 5555", what)
            script = self.work / f"snippet_{block.line}.py"
            script.write_text(code)
            print(f"  python {script.name}")
            self.run(f"{shlex.quote(sys.executable)} {script.name}", what)
        finally:
            self.stop_all()

    def json_block(self, block: Block) -> None:
        what = f"README line {block.line} ({block.section})"
        try:
            data = json.loads(block.text)
        except json.JSONDecodeError as exc:
            raise CheckFailed(f"{what}: not valid JSON: {exc}") from None
        path = self.work / f"block_{block.line}.json"
        path.write_text(block.text)
        if "cameras" in data:  # a converter column map
            if not (self.work / "demos.hdf5").is_file():
                self.run("python3 -m policyserve record --task lift --n-demos 1 --output demos.hdf5 --camera-size 32",
                         what)
            print(f"  convert with --column-map {path.name}")
            self.run(f"python3 -m policyserve convert hdf5-to-lerobot --input demos.hdf5 --output colmap_out "
                     f"--column-map {path.name}", what)
        elif "actions" in data and "video" in data:  # an openpi key map, for gr1.PickNPlace
            print(f"  serve gr1.PickNPlace to openpi clients with --openpi-key-map {path.name}")
            proc = self.start_server(f"python3 -m policyserve serve --port 0 --dataset-path "
                                     f"{SHARED}/datasets/gr1.PickNPlace --openpi-port 0 --openpi-key-map {path.name}",
                                     what)
            self.stop(proc)

    def plain(self, block: Block) -> None:
        what = f"README line {block.line} ({block.section})"
        if "policyserve_requests_total" in block.text:
            self.metrics(block, what)
        elif block.text.lstrip().startswith("src/policyserve/"):
            self.layout(block, what)

    def metrics(self, block: Block, what: str) -> None:
        import urllib.request

        names = set(re.findall(r"^(policyserve_\w+?)(?:_bucket|_count|_sum|_total)?(?:\{|\s)", block.text, re.M))
        proc = self.start_server("python3 -m policyserve serve --port 0 --metrics-port 9464", what)
        try:
            port = None
            for _ in range(50):
                try:
                    scrape = urllib.request.urlopen("http://127.0.0.1:9464/metrics", timeout=5).read().decode()
                    port = 9464
                    break
                except OSError:
                    time.sleep(0.1)
            if port is None:
                raise CheckFailed(f"{what}: no metrics on port 9464")
        finally:
            self.stop(proc)
        missing = sorted(n for n in names if n not in scrape)
        print(f"  {len(names)} metric families in the sample, all in a real scrape" if not missing else "")
        if missing:
            raise CheckFailed(f"{what}: metrics shown in the README but not served: {missing}")

    def layout(self, block: Block, what: str) -> None:
        base = ROOT / "src" / "policyserve"
        missing = []
        for line in block.text.splitlines():
            folder = re.match(r"\s*(\w+)/\s", line)
            current = None
            if folder:  # a top-level folder, or one nested in the package (serving's doors/)
                found = [d for d in (base / folder.group(1), ROOT / folder.group(1)) if d.is_dir()]
                found += [d for d in base.rglob(folder.group(1)) if d.is_dir()]
                if not found:
                    missing.append(folder.group(1) + "/")
                current = found[0] if found else None
            for name in re.findall(r"([\w]+\.(?:py|json))", line):
                if current and (current / name).exists():
                    continue
                if not list(base.rglob(name)) and not list((ROOT / "benchmarks").glob(name)):
                    missing.append(name)
        print(f"  layout: {'every file exists' if not missing else missing}")
        if missing:
            raise CheckFailed(f"{what}: the layout names files that do not exist: {missing}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one command may take")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="readme-check-"))
    checker = Checker(work, args.timeout)
    started = time.monotonic()
    all_blocks = blocks(args.readme)
    try:
        for n, block in enumerate(all_blocks, 1):
            print(f"[{n}/{len(all_blocks)}] README line {block.line}: {block.lang or 'text'} ({block.section})",
                  flush=True)
            handler = {"bash": checker.bash, "python": checker.python, "json": checker.json_block}.get(
                block.lang, checker.plain)
            began = time.monotonic()
            handler(block)
            print(f"  ({time.monotonic() - began:.0f} s)", flush=True)
    except (CheckFailed, subprocess.TimeoutExpired) as exc:
        print(f"\nREADME check FAILED: {exc}", flush=True)
        return 1
    finally:
        checker.stop_all()
        if not args.keep:
            subprocess.run(["rm", "-rf", str(work)], check=False)
    print(f"\nREADME check passed: {len(all_blocks)} blocks in {time.monotonic() - started:.0f} s ({work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
