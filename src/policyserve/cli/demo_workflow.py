"""The ``policyserve demo`` workflow: the seed workflow end to end on one machine, in a few minutes on 2 CPU cores.

1. record a few scripted demos (small cameras) to HDF5; 2. convert them to a LeRobot dataset;
3. optionally train a tiny model on it (``model_steps > 0`` and the model extra installed);
4. start a replay server and a "model" server (the trained checkpoint, else the scripted expert served
over the network) as subprocesses; 5. run the model-vs-replay comparison rollout on demo 0;
6. run a short evaluation of the model server; 7. print where the report, plot and videos are.
Every server started here is stopped in ``finally`` (errors and Ctrl-C included). It lives in the CLI layer
because it runs ``policyserve train`` and ``policyserve serve`` as subprocesses.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..client.connect import connect_policy
from ..errors import ConfigError
from ..launch import ServerProcess


@dataclass
class DemoConfig:
    """Sizes of every stage of the demo; defaults keep it to a few minutes on 2 cores."""

    task: str = "lift"
    """Built-in Franka task: lift or stack."""
    output: str | None = None
    """Output directory (default ./outputs/demo-<timestamp>)."""
    n_demos: int = 3
    """Scripted demos to record."""
    camera_size: tuple[int, int] = (64, 64)
    """Camera image size (H, W) of the recorded demos and the evaluation envs."""
    model_steps: int = 50
    """Train a tiny model for this many steps and serve it (about a minute on 2 cores); 0 serves the scripted
    expert as the model server instead."""
    eval_episodes: int = 4
    """Episodes of the closing evaluation of the model server."""
    eval_envs: int = 2
    """Envs the closing evaluation steps together."""
    max_episode_steps: int = 150
    """Steps after which a recorded or evaluated episode ends."""
    seed: int = 0
    """Seed of the recording (demo k resets with seed + k) and of the evaluation."""
    policy_seed: int | str | None = "run"
    """Seed sent with every model ``get_action`` (``options={'seed': S}``): "run" (default) sends ``seed``,
    None sends none (unseeded sampling)."""
    train_timeout_s: float = 600.0
    """How long training may take before the demo fails."""
    progress: bool = True
    """Show progress bars."""

    MINIMUM = {"n_demos": 1, "model_steps": 0, "eval_episodes": 1, "eval_envs": 1, "max_episode_steps": 1}

    def __post_init__(self) -> None:
        for name, least in self.MINIMUM.items():
            if getattr(self, name) < least:
                raise ConfigError(f"{name} must be at least {least}, got {getattr(self, name)}")
        if self.policy_seed != "run" and self.policy_seed is not None and not isinstance(self.policy_seed, int):
            raise ConfigError(f"policy_seed must be an integer, 'run' or None, got {self.policy_seed!r}")


@dataclass
class DemoResult:
    """Where the demo wrote its outputs, and what it measured."""

    output: str
    model_kind: str
    files: dict[str, str] = field(default_factory=dict)
    comparison: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    seeds: dict[str, Any] = field(default_factory=dict)
    """The seeds used: recording (demo k: recording + k), evaluation (episode k: evaluation + k), policy."""


def model_training_available() -> bool:
    """True when ``policyserve train`` (the model extra, torch) can run here."""
    return importlib.util.find_spec("torch") is not None and importlib.util.find_spec("policyserve.cli.train") is not None


def _log(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def _train(config: DemoConfig, dataset: Path, out: Path, log_path: Path) -> Path:
    """Train the tiny model in a subprocess; returns the newest checkpoint directory."""
    cmd = [sys.executable, "-m", "policyserve", "train", "--dataset-path", str(dataset), "--output-dir", str(out),
           "--max-steps", str(config.model_steps), "--save-steps", str(config.model_steps),
           "--embodiment-tag", "franka_panda", "--no-progress"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            code = proc.wait(config.train_timeout_s)
        except BaseException:
            proc.kill()
            proc.wait(10)
            raise
    if code != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"training failed (exit {code}); log {log_path}:\n{tail}")
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    if not checkpoints:
        raise RuntimeError(f"training wrote no checkpoint-<step> directory under {out}")
    return checkpoints[-1]


def run_demo(config: DemoConfig) -> DemoResult:
    """Run every stage (see module docstring); returns the output paths and headline numbers."""
    from ..data.hdf5_to_lerobot import convert_hdf5_to_lerobot
    from ..sim.recorder import record_demos
    from ..client.driver import DriverConfig
    from ..eval.compare import ComparisonConfig, run_comparison
    from ..eval.envs import EnvConfig
    from ..eval.rollout import RolloutConfig, run_rollout

    out = Path(config.output or f"outputs/demo-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    use_model = config.model_steps > 0 and model_training_available()
    result = DemoResult(str(out), "model" if use_model else "scripted")
    result.seeds = {"recording": config.seed, "evaluation": 1000 + config.seed,
                    "policy": config.seed if config.policy_seed == "run" else config.policy_seed}
    if config.model_steps > 0 and not use_model:
        _log("model training is not available here (torch or 'policyserve train' missing): serving the scripted expert")
    servers: list[ServerProcess] = []
    clients: list[Any] = []
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        result.seconds[name] = round(now - clock, 1)
        clock = now

    try:
        hdf5 = out / "demos.hdf5"
        _log(f"1/6 recording {config.n_demos} scripted {config.task} demos -> {hdf5}")
        record_demos(config.task, config.n_demos, hdf5, camera_size=config.camera_size, seed=config.seed,
                     max_episode_steps=config.max_episode_steps, progress=config.progress)
        lap("record")
        dataset = out / "dataset"
        _log(f"2/6 converting to a LeRobot dataset -> {dataset}")
        # training reports an eval loss on an 'eval' split: hold out the last demo when there is a model to train
        eval_proportion = 1.0 / config.n_demos if use_model and config.n_demos > 1 else 0.0
        convert_hdf5_to_lerobot(hdf5, dataset, progress=config.progress, overwrite=True,
                                eval_proportion=eval_proportion)
        lap("convert")
        if use_model:
            _log(f"3/6 training a tiny model for {config.model_steps} steps (log: logs/train.log)")
            model_args = ["--model-path", str(_train(config, dataset, out / "model", out / "logs" / "train.log"))]
            n_action_steps = 8
        else:
            _log("3/6 no model training (--model-steps 0): the scripted expert is served as the model")
            model_args = ["--policy", f"scripted:{config.task}"]
            n_action_steps = 1  # the scripted expert advances its phase once per query
        lap("train")
        _log("4/6 starting the replay and model servers")
        replay = ServerProcess(["--dataset-path", str(dataset), "--embodiment-tag", "franka_panda",
                                "--execution-horizon", "1"], name="replay server", log_path=out / "logs" / "replay.log")
        servers.append(replay)
        replay.start()
        model = ServerProcess(model_args, name="model server", log_path=out / "logs" / "model.log")
        servers.append(model)
        model.start()
        _log(f"   replay server on port {replay.port}, model server ({result.model_kind}) on port {model.port}")
        model_client = connect_policy(model.host, model.port, timeout_ms=60000, role="model")
        clients.append(model_client)
        replay_client = connect_policy(replay.host, replay.port, timeout_ms=60000, role="replay")
        clients.append(replay_client)
        lap("servers")
        _log("5/6 comparison rollout: model (env 0) vs replay (env 1) from demo 0, step 0")
        env = EnvConfig(task=config.task, sim=replace(EnvConfig().sim, camera_size=config.camera_size))
        options = None if result.seeds["policy"] is None else {"seed": result.seeds["policy"]}
        comparison = run_comparison(model_client, replay_client, ComparisonConfig(
            env=env, driver=DriverConfig(n_action_steps=n_action_steps, action_options=options), hdf5_path=str(hdf5),
            demo_index=0,
            start_step=0, output_dir=str(out / "compare"), progress=config.progress))
        result.comparison = comparison.summary()
        result.files.update({f"comparison_{k}": v for k, v in comparison.files.items()})
        lap("compare")
        _log(f"6/6 evaluating the model server: {config.eval_episodes} episodes on {config.eval_envs} envs")
        report = run_rollout(model_client, RolloutConfig(
            env=env, driver=DriverConfig(n_action_steps=n_action_steps, action_options=options),
            n_episodes=config.eval_episodes, n_envs=config.eval_envs, max_episode_steps=config.max_episode_steps,
            seed=result.seeds["evaluation"], video_dir=str(out / "rollout" / "videos"), max_videos=2,
            progress=config.progress), report_path=out / "rollout" / "report.json")
        result.evaluation = {"success_rate": report.success_rate, "ci95": list(report.ci95),
                             "mean_return": report.mean_return, "summary": report.summary()}
        result.files["rollout_report"] = str(out / "rollout" / "report.json")
        result.files["rollout_videos"] = str(out / "rollout" / "videos")
        lap("rollout")
    finally:
        for client in clients:
            client.close()
        for server in reversed(servers):
            server.stop()
    summary = out / "summary.json"
    result.files["summary"] = str(summary)
    summary.write_text(json.dumps(asdict(result), indent=2))
    return result


def print_result(result: DemoResult, wall_s: float) -> None:
    """The demo's closing message: headline numbers and where every output is."""
    c, e = result.comparison, result.evaluation
    print("\n=== policyserve demo finished in %.0f s ===" % wall_s)
    print(f"model: {result.model_kind}")
    steps = ", ".join(f"{k} {v}" for k, v in (c.get("action_divergence_per_key") or {}).items())
    diffs = ", ".join(f"{k} {v:.4f}" for k, v in (c.get("max_action_diff_per_key") or {}).items())
    print(f"comparison: {c.get('steps')} steps, eef divergence step {c.get('divergence_step')}, "
          f"action divergence step {steps or None}, max action diff {diffs or None}, success model "
          f"{c.get('success_model')} replay {c.get('success_replay')}")
    print(f"seeds: {result.seeds}")
    print(f"evaluation: {e.get('summary')}")
    labels = {"comparison_plot": "comparison plot", "comparison_video": "comparison video",
              "comparison_json": "comparison traces (JSON)", "comparison_csv": "comparison traces (CSV)",
              "rollout_report": "evaluation report", "rollout_videos": "evaluation videos", "summary": "summary"}
    for key, label in labels.items():
        if key in result.files:
            print(f"  {label + ':':28s} {result.files[key]}")
