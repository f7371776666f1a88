"""Distributed rollout and dataset-wide comparison on a real two-node Ray cluster (ray.cluster_utils.Cluster).

One policy server (the scripted expert) and one replay server run on loopback; the workers reach them over
ZeroMQ. Small cameras, few episodes and short episodes keep the file well under the 5 minute Ray budget.
Run by tests/test_ray.py in a process of its own (Ray keeps per-process state across sessions).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("robosuite")
ray = pytest.importorskip("ray")

from policyserve.cli.main import main as cli_main  # noqa: E402
from policyserve.client.connect import ServerUnavailableError  # noqa: E402
from policyserve.client.driver import DriverConfig  # noqa: E402
from policyserve.launch import free_port  # noqa: E402
from policyserve.eval.compare import ComparisonConfig, run_comparison  # noqa: E402
from policyserve.eval.compare_all import run_all_comparisons  # noqa: E402
from policyserve.cluster.pool import DistributedConfig  # noqa: E402
from policyserve.eval.distributed import (  # noqa: E402
    ServerAddress, run_distributed_comparisons, run_distributed_rollout,
)
from policyserve.eval.envs import EnvConfig  # noqa: E402
from policyserve.sim.envs import FrankaEnvConfig  # noqa: E402
from policyserve.eval.rollout import RolloutConfig, run_rollout  # noqa: E402
from policyserve.policies.base import PolicyWrapper  # noqa: E402

pytestmark = [pytest.mark.sim, pytest.mark.timeout(900)]  # bounded, with room for a machine under load
ROOT = Path(__file__).resolve().parents[1]
SIZE = (32, 32)
ENV = EnvConfig(task="lift", sim=FrankaEnvConfig(camera_names=("table_cam",), camera_size=SIZE))
N_EPISODES = 6


@pytest.fixture(scope="module")
def cluster():
    """A head node and a second node, one CPU each: one worker per node."""
    from ray.cluster_utils import Cluster

    store = 80 * 2**20
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": store,
                                                      "include_dashboard": False})
    c.add_node(num_cpus=1, object_store_memory=store)
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def expert():
    """The scripted lift expert served on loopback (one chunk per executed action)."""
    from helpers import Served
    from policyserve.sim.scripted import make_scripted_policy

    served = Served(make_scripted_policy("lift", n_action_steps=1))
    yield served
    served.close()


def rollout_config(**kwargs) -> RolloutConfig:
    base = dict(env=ENV, driver=DriverConfig(n_action_steps=1), n_episodes=N_EPISODES, n_envs=1,
                max_episode_steps=50, seed=11, progress=False)
    return RolloutConfig(**{**base, **kwargs})


def outcomes(episodes) -> list[tuple]:
    return [(e.episode, e.seed, e.success, e.steps, round(e.reward, 9)) for e in episodes]


@pytest.fixture(scope="module")
def single_process(expert):
    """The single-process rollout every distributed run must reproduce episode by episode."""
    report = run_rollout(expert.client, rollout_config())
    result = outcomes(report.episodes)
    assert len({(o[2], o[3]) for o in result}) > 1  # the episodes differ, so a mix-up would show
    return result


def test_two_workers_on_two_nodes_give_the_single_process_results(cluster, expert, single_process, tmp_path):
    report = run_distributed_rollout(ServerAddress(port=expert.port), rollout_config(video_dir=str(tmp_path / "v"),
                                                                                      max_videos=2),
                                     DistributedConfig(workers=2))
    assert outcomes(report.episodes) == single_process
    t = report.timing
    assert t["workers"] == 2 and t["worker_nodes"] == 2 and t["worker_failures"] == 0 and t["requeued"] == []
    assert {e.worker for e in report.episodes} == {0, 1}  # both workers pulled episodes from the queue
    assert t["env_steps"] == sum(o[3] for o in single_process) and t["env_steps_per_s"] > 0
    assert len(t["worker_peak_rss_mb"]) == 2 and all(m > 50 for m in t["worker_peak_rss_mb"])
    from policyserve.data.video import decode_video

    videos = sorted(p.name for p in (tmp_path / "v").iterdir())
    assert videos == [f"episode_{e.episode:03d}_s{int(e.success)}.mp4" for e in report.episodes[:2]]
    for e in report.episodes[:2]:
        assert Path(e.video).parent == tmp_path / "v" and len(decode_video(e.video)) == e.steps + 1
    assert all(e.video is None for e in report.episodes[2:])


def test_a_worker_killed_mid_run_loses_and_duplicates_no_episode(cluster, expert, single_process):
    killed = []

    def kill_a_busy_worker(pool, episode):
        busy = [w for w in pool.workers.values() if w.inflight and w.call is not None]
        if not killed and busy:
            killed.append((busy[0].wid, list(busy[0].inflight)))
            ray.kill(busy[0].handle)  # a real kill of the actor process, mid-episode

    report = run_distributed_rollout(ServerAddress(port=expert.port), rollout_config(n_envs=2),
                                     DistributedConfig(workers=2, on_result=kill_a_busy_worker))
    assert killed, "no worker was busy when the first episode finished"
    wid, inflight = killed[0]
    t = report.timing
    # (were the call's result already stored when the kill came, the worker's next episodes are the lost ones)
    assert t["worker_failures"] == 1 and t["requeued"] and set(t["requeued"]) <= set(range(N_EPISODES))
    assert [e.episode for e in report.episodes] == list(range(N_EPISODES))  # each exactly once
    assert outcomes(report.episodes) == single_process
    assert all(e.worker != wid for e in report.episodes if e.episode in t["requeued"])  # re-run elsewhere
    assert len(t["worker_peak_rss_mb"]) == 3  # the dead worker was replaced


def test_a_node_that_dies_mid_run_has_its_episodes_rerun_on_the_other(cluster, expert, single_process):
    head = ray.get_runtime_context().get_node_id()
    removed = []

    def remove_a_busy_node(pool, episode):
        busy = [w for w in pool.workers.values() if w.inflight and w.call is not None and w.info["node"] != head]
        if not removed and busy:
            node = next(n for n in cluster.worker_nodes if n.node_id == busy[0].info["node"])
            removed.append(busy[0].wid)
            cluster.remove_node(node, allow_graceful=False)  # raylet and the worker on it killed

    try:
        report = run_distributed_rollout(ServerAddress(port=expert.port), rollout_config(),
                                         DistributedConfig(workers=2, on_result=remove_a_busy_node))
    finally:
        if len(cluster.worker_nodes) < 1:
            cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)
            cluster.wait_for_nodes()
    assert removed, "no worker on the second node was busy when the first episode finished"
    # the worker may still return an episode while its node goes down; what it had in flight when it died is re-run
    requeued = report.timing["requeued"]
    # The removal races the worker's last reply: when it got its result out first (seen under heavy load), the
    # pool has nothing to re-run and may finish before it notices the dead node; otherwise the loss is re-run.
    assert report.timing["worker_failures"] in (0, 1)
    assert bool(requeued) == (report.timing["worker_failures"] == 1)
    assert all(e.worker != removed[0] for e in report.episodes if e.episode in requeued)
    assert [e.episode for e in report.episodes] == list(range(N_EPISODES))
    assert outcomes(report.episodes) == single_process


def test_cli_rollout_with_workers_joins_the_cluster_and_writes_here(cluster, expert, single_process, tmp_path):
    report, videos = tmp_path / "report.json", tmp_path / "videos"
    cmd = [sys.executable, "-m", "policyserve.cli.main", "rollout", "--port", str(expert.port), "--workers", "2",
           "--ray-address", cluster.address, "--n-episodes", str(N_EPISODES), "--max-episode-steps", "50",
           "--seed", "11", "--n-action-steps", "1", "--camera-size", "32", "--video-dir", str(videos),
           "--max-videos", "1", "--report", str(report), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 workers on 2 node(s)" in proc.stdout and "success rate:" in proc.stdout
    data = json.loads(report.read_text())
    got = [(e["episode"], e["seed"], e["success"], e["steps"], round(e["return"], 9)) for e in data["episodes"]]
    assert got == single_process and data["config"]["workers"] == 2
    assert [p.name for p in videos.iterdir()] == [Path(data["episodes"][0]["video"]).name]
    assert ray.is_initialized() and len([n for n in ray.nodes() if n["Alive"]]) == 2  # the cluster stays up


def test_rollout_without_workers_does_not_import_ray(tmp_path):
    code = ("import sys; from policyserve.cli.main import main; "
            "rc = main(['rollout', '--policy', 'scripted', '--n-episodes', '1', '--max-episode-steps', '3', "
            "'--camera-size', '32', '--quiet']); "
            "print('RAY' if 'ray' in sys.modules else 'NO-RAY'); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_env(),
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "NO-RAY"


def test_workers_that_cannot_reach_the_server_fail_with_its_error(cluster):
    port = free_port()
    start = time.monotonic()
    with pytest.raises(ServerUnavailableError, match=f"no policy server answering at tcp://127.0.0.1:{port}"):
        run_distributed_rollout(ServerAddress(port=port), rollout_config(n_episodes=2), DistributedConfig(workers=2))
    assert time.monotonic() - start < 60
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2


@pytest.mark.parametrize("argv, message", [
    (["--workers", "0"], "--workers must be >= 1, got 0"),
    (["--ray-address", "127.0.0.1:1"], "--ray-address needs --workers K"),
    (["--workers", "2", "--policy", "scripted"], "--policy scripted runs in this process only"),
])
def test_cli_rollout_rejects_bad_worker_flags(argv, message, capsys):
    code = cli_main(["rollout", "--n-episodes", "1", "--quiet", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_ctrl_c_shuts_the_local_ray_instance_down(expert, tmp_path):
    """--workers without --ray-address starts a local Ray instance; Ctrl-C stops the run and every Ray process:
    the command returns only once they have all exited (no waiting here), with 130, not a crash at exit."""
    cmd = [sys.executable, "-m", "policyserve.cli.main", "rollout", "--port", str(expert.port), "--workers", "1",
           "--n-episodes", "200", "--max-episode-steps", "50", "--n-action-steps", "1", "--camera-size", "32",
           "--quiet"]
    from helpers import default_sigint

    proc = subprocess.Popen(cmd, env=_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)
    try:
        deadline = time.monotonic() + 180  # the worker actor runs (ray.init done, the run under way)
        while time.monotonic() < deadline and proc.poll() is None and \
                not any("RolloutWorker" in _cmdline(p) for p in _descendants(proc.pid)):
            time.sleep(0.5)
        time.sleep(2)  # let the worker start stepping
        ray_pids = _descendants(proc.pid)
        assert any("RolloutWorker" in _cmdline(p) for p in ray_pids), [_cmdline(p)[:80] for p in ray_pids]
        assert any("raylet" in _cmdline(p) for p in ray_pids) and any("gcs_server" in _cmdline(p) for p in ray_pids)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130 and "interrupted" in err, (proc.returncode, err[-2000:])
    # the shutdown waited for them (runtime.leave_ray); a short grace only for the kernel to reap the last ones
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and [p for p in ray_pids if _alive(p)]:
        time.sleep(0.2)
    assert [(p, _cmdline(p)[:80]) for p in ray_pids if _alive(p)] == []


def test_ctrl_c_while_the_local_ray_instance_starts_stops_what_started(tmp_path):
    """Ctrl-C while ray.init is still starting the local instance (right after its raylet, whose agents and
    workers are on their way): every process it had started exits before join_ray re-raises it."""
    code = """if True:
        import os, sys
        import ray
        from ray._private.node import Node
        from policyserve.cluster.runtime import join_ray

        start_raylet = Node.start_raylet

        def start_raylet_then_ctrl_c(self, *args, **kwargs):  # deterministic: a signal may land in a __del__
            start_raylet(self, *args, **kwargs)
            raise KeyboardInterrupt

        Node.start_raylet = start_raylet_then_ctrl_c
        try:
            join_ray(num_cpus=1)
            print("started")
        except KeyboardInterrupt:
            print("interrupted")
        sys.stdout.flush()
        os._exit(0)
    """
    proc = subprocess.Popen([sys.executable, "-c", code], env=_env(), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen: dict[int, str] = {}
    try:
        while proc.poll() is None:
            seen.update({p: c for p in _descendants(proc.pid) if (c := _cmdline(p))})  # latest: after exec
            time.sleep(0.02)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert out.strip() == "interrupted", (out, err[-2000:])
    assert any("gcs_server" in c for c in seen.values()) and any("raylet" in c for c in seen.values()), seen
    assert [(p, c[:80] + " ... " + c[-120:]) for p, c in seen.items() if _alive(p)] == []


# ------------------------------------------------------------------------------------------ compare --all-demos
class Demonstrator(PolicyWrapper):
    """A "model" acting like the demo (a replay behind it, one cursor per client) that does not say it replays;
    from its ``after``-th action of demo ``perturb_demo`` on, its arm action gets +0.5 on axis 0."""

    def __init__(self, replay, perturb_demo: int, after: int = 5):
        super().__init__(replay, strict=False)
        self.perturb_demo, self.after = perturb_demo, after
        self.demo: dict[str, int] = {}
        self.calls: dict[str, int] = {}

    def serve_reset(self, options=None, client=""):
        demo = (options or {}).get("demo_index")  # the driver's per-env reset sends one entry per env
        self.demo[client], self.calls[client] = (demo[0] if isinstance(demo, list) else demo), 0
        self.policy.serve_reset(options, client)
        return {}

    def serve_batch(self, requests):
        outcomes = []
        for request in requests:
            outcome = self.policy.serve_batch([request])[0]
            if not isinstance(outcome, Exception):
                action = dict(outcome[0])
                if self.demo.get(request.client) == self.perturb_demo and self.calls[request.client] >= self.after:
                    action["arm"] = action["arm"].copy()
                    action["arm"][..., 0] += 0.5
                self.calls[request.client] = self.calls.get(request.client, 0) + 1
                outcome = (action, {})
            outcomes.append(outcome)
        return outcomes

    def _get_action(self, observation, options=None):
        raise NotImplementedError("served only")


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    """Three recorded scripted lift demos, their LeRobot dataset, a model server (diverging on demo 1 only) and
    one replay server shared by every worker."""
    from helpers import Served
    from policyserve.data.hdf5_to_lerobot import convert_hdf5_to_lerobot
    from policyserve.policies.replay import make_replay_policy
    from policyserve.sim.recorder import record_demos

    root = tmp_path_factory.mktemp("demos")
    hdf5 = root / "lift.hdf5"
    assert record_demos("lift", 3, hdf5, camera_size=SIZE, seed=0, max_episode_steps=80, progress=False)["demos"] == 3
    convert_hdf5_to_lerobot(hdf5, root / "dataset", progress=False)

    def replay():
        return make_replay_policy(root / "dataset", 1, embodiment_tag="franka_panda")

    model, rep = Served(Demonstrator(replay(), perturb_demo=1)), Served(replay())
    yield hdf5, model, rep
    model.close()
    rep.close()


def compare_config(out, **kwargs) -> ComparisonConfig:
    return ComparisonConfig(env=ENV, hdf5_path=str(kwargs.pop("hdf5")), max_steps=20, eef_threshold=0.005,
                            output_dir=None if out is None else str(out), progress=False, **kwargs)


ROW_KEYS = ("demo_index", "steps", "divergence_step", "action_divergence_step", "max_eef_distance",
            "max_action_diff", "success_model", "success_replay")


def test_compare_all_demos_reports_every_demo_locally_and_on_ray(cluster, demos, tmp_path):
    hdf5, model, rep = demos
    # the reference: the single-demo comparison, demo by demo
    single = {}
    for demo in (0, 1, 2):
        result = run_comparison(model.client, rep.client, compare_config(None, hdf5=hdf5, demo_index=demo))
        single[demo] = (demo, *[result.summary()[k] for k in ROW_KEYS[1:]])
    assert single[1][3] == 5 and single[1][2] is not None  # demo 1 diverges, the others do not
    assert single[0][2] is None and single[2][2] is None and single[0][5] == 0.0

    local = run_all_comparisons(model.client, rep.client, compare_config(tmp_path / "local", hdf5=hdf5))
    dist = run_distributed_comparisons(ServerAddress(port=model.port), ServerAddress(port=rep.port),
                                       compare_config(tmp_path / "ray", hdf5=hdf5), DistributedConfig(workers=2))
    for report, out in ((local, tmp_path / "local"), (dist, tmp_path / "ray")):
        rows = {d.demo_index: tuple(getattr(d, k) for k in ROW_KEYS) for d in report.demos}
        assert rows == single
        data = json.loads((out / "aggregate.json").read_text())
        assert [tuple(d[k] for k in ROW_KEYS) for d in data["demos"]] == [single[d] for d in (0, 1, 2)]
        assert data["summary"]["diverged"] == 1 and data["summary"]["demos"] == 3
        csv_lines = (out / "aggregate.csv").read_text().splitlines()
        assert csv_lines[0].startswith("demo_index,steps,divergence_step") and len(csv_lines) == 4
        assert csv_lines[1].split(",")[2] == "" and csv_lines[2].split(",")[2] == str(single[1][2])
        import matplotlib.image

        image = matplotlib.image.imread(out / "summary.png")
        assert image.ndim == 3 and image.shape[0] > 300 and image.std() > 0.05
        for demo in (0, 1, 2):
            folder = out / f"demo_{demo}"
            for name in ("comparison.json", "traces.csv", "comparison.png", "comparison.mp4"):
                assert (folder / name).stat().st_size > 0, folder / name
            saved = json.loads((folder / "comparison.json").read_text())
            assert saved["config"]["demo_index"] == demo
            assert all(Path(p).parent == folder for p in saved["files"].values())  # paths on the driver
    assert dist.timing["worker_nodes"] == 2 and dist.timing["worker_failures"] == 0


def test_cli_compare_all_demos_and_flag_errors(demos, tmp_path, capsys):
    hdf5, model, rep = demos
    common = ["compare", "--task", "lift", "--hdf5-path", str(hdf5), "--model-port", str(model.port),
              "--replay-port", str(rep.port), "--camera-size", "32", "--max-steps", "10", "--quiet", "--no-video"]
    code = cli_main([*common, "--all-demos", "--eef-threshold", "0.005", "--output", str(tmp_path / "all")])
    out = capsys.readouterr().out
    assert code == 0 and "3 demos: 1 diverged" in out and "summary.png" in out
    assert (tmp_path / "all" / "summary.png").stat().st_size > 0
    for argv, message in ((["--workers", "2"], "add --all-demos"),
                          (["--all-demos", "--demo-index", "1"], "either --demo-index or --all-demos"),
                          (["--all-demos", "--ray-address", "127.0.0.1:1"], "--ray-address needs --workers"),
                          (["--all-demos", "--start-step", "500"], "start step 500 is out of range for demo_0")):
        code = cli_main([*common, *argv, "--output", str(tmp_path / "bad")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (tmp_path / "bad").exists()
    assert model.client.ping() and rep.client.ping()


# ------------------------------------------------------------------------------------------ helpers
def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    env.setdefault("MUJOCO_GL", "egl")
    env.pop("RAY_ADDRESS", None)
    return env


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    return children


def _descendants(pid: int) -> list[int]:
    children, found, todo = _children(), [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
