"""Model-vs-replay comparison rollout: two envs restored to a recorded demo state, stepped in lockstep.

Env 0 is driven by the model policy, env 1 by the replay policy (reset to ``demo_index``,
``step_index=start_step``: the replay finds demo_N's episode through the dataset's demo map, so demo_N meets
its own episode also when the HDF5 file has gaps), each through its own
:class:`~policyserve.client.driver.PolicyDriver`. The replay side follows the execution horizon the replay
reports in its replies, whatever it was started with. The replay policy must say ``"replay": True`` in its
replies and the model policy must not, so swapped servers fail with a clear error, and the replay must serve
the dataset converted from ``hdf5_path`` (:func:`~policyserve.eval.identity.check_replay_identity`: the source
file, the demo, its length and the first action), else an :class:`~policyserve.eval.identity.IdentityError`
naming both files. Nothing is written before these checks pass. The env's task and camera size are the ones
the HDF5 file records unless given (a conflicting one is an error). Both envs start from the demo's recorded
sim state at ``start_step``. Per step the comparison records both actions, their difference per action key,
both end-effector positions and both envs' success; the action divergence is judged per action key
(:mod:`~policyserve.eval.divergence` states the rule) against the model's own sampling noise: with each model
query the model side also asks for ``noise_samples`` more samples at the same observation under other seeds
(extra rows of the same batched call, not executed), and a difference from the demo counts only where it goes
beyond them. It writes the traces as JSON and CSV, a figure of action
dimensions and eef trajectories with the first divergence marked, and a side-by-side video.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..client.driver import DriverConfig, PolicyDriver
from ..data.demos import DemoFile
from ..data.video import VideoWriter
from ..errors import ConfigError, ValidationError
from ..policies.base import BasePolicy
from ..sim.vector import EnvBatch
from .divergence import ACTION_WINDOW, divergence_steps, first_step, max_diff_per_key
from .envs import EnvConfig, make_envs
from .frames import compose_frame
from .identity import check_replay_identity, demo_env_settings, demo_reset_options, warn_camera_size
from .rollout import FRANKA_DELTA_DIMS, config_dict
from .smoothness import Smoothness, smoothness

SIDES = ("model", "replay")


class ModalityMismatchError(ConfigError):
    """A server's modality config does not fit the env (missing observation key, wrong action size)."""


class PolicyRoleError(ConfigError):
    """The replay policy is not a replay, or the model policy is one (swapped servers)."""


@dataclass
class ComparisonConfig:
    """Which demo state to start from, how long to run and where to write the outputs."""

    env: EnvConfig | None = None
    """The envs' task and camera size; default: the ones ``hdf5_path`` records (given ones must agree with it)."""
    driver: DriverConfig = field(default_factory=lambda: DriverConfig(n_action_steps=1))
    """How the model side runs (``n_action_steps`` model actions per model query, key map, options, async)."""
    hdf5_path: str = ""
    """The recorded demos (HDF5) the replay server's dataset was converted from."""
    demo_index: int = 0
    """Compare from demo ``demo_<N>``'s recorded state."""
    start_step: int = 0
    """Demo step both envs start from."""
    max_steps: int | None = None
    """Default: the rest of the demo (``num_samples - start_step``)."""
    eef_threshold: float = 0.02
    """Metres between the two end effectors that count as diverged."""
    action_threshold: float = 0.1
    """Action difference (per dimension of an action key), beyond the model's own resamples, that counts as a
    divergence when it persists over ``action_window`` steps (the rule: policyserve.eval.divergence)."""
    action_window: int = ACTION_WINDOW
    """Steps over which an action difference must persist on average to count as a divergence (1: any step)."""
    noise_samples: int = 2
    """More model samples per model query at the same observation under other seeds, not executed: the noise
    reference of the action-divergence rule (0: a fixed threshold, which a sampling model's noise can exceed)."""
    output_dir: str | None = None
    """Folder for the traces (JSON, CSV), the figure and the video (nothing written without it)."""
    video: bool = True
    """Write the side-by-side MP4."""
    fps: int = 20
    """Frame rate of the video."""
    progress: bool = True
    """Show a progress bar."""


@dataclass
class StepRecord:
    """One lockstep step: actions of both sides, their per-key difference, eef positions, success."""

    step: int
    demo_step: int
    model_action: list[float]
    replay_action: list[float]
    action_diff: dict[str, float]
    eef_model: list[float]
    eef_replay: list[float]
    eef_distance: float
    success_model: bool
    success_replay: bool
    model_source: int = -1
    """Which model reply the model action came from (negative: holding still), see ``PolicyDriver.last_sources``."""
    model_resamples: list[list[float]] = field(default_factory=list)
    """The model's other samples at this step (``noise_samples`` of them, not executed): its noise reference."""
    model_noise: dict[str, float] = field(default_factory=dict)
    """Per action key, the largest |model action - resample| at this step (the model's own sampling spread)."""


@dataclass
class ComparisonResult:
    """Traces of a comparison rollout, divergence steps and the files written."""

    steps: list[StepRecord]
    action_keys: list[str]
    action_dims: dict[str, int]
    divergence_step: int | None
    action_divergence_step: int | None
    config: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    first_obs_diff: dict[str, float | None] = field(default_factory=dict)
    """Model side: max |first observation - the demo's recorded one at start_step| per recorded key (None where
    the shapes differ, e.g. another camera size); zero when the restore is exact."""
    action_divergence_per_key: dict[str, int | None] = field(default_factory=dict)
    """Per action key, the first step the model's actions diverge from the replay's (None: never)."""
    demo_length: int | None = None
    """Samples of the demo in the HDF5 file."""
    demo_split: str | None = None
    """The split ("train"/"eval") of the demo's episode in the replayed dataset, as the replay reports it."""

    @property
    def max_action_diff_per_key(self) -> dict[str, float]:
        """Largest |model - replay| action difference per action key over the compared steps."""
        return max_diff_per_key(np.array([s.model_action for s in self.steps], dtype=np.float64),
                                np.array([s.replay_action for s in self.steps], dtype=np.float64), self.action_dims)

    @property
    def model_resamples(self) -> np.ndarray | None:
        """(T, J, A) model resamples over the compared steps, None without any (``noise_samples`` 0)."""
        if not self.steps or not self.steps[0].model_resamples:
            return None
        return np.array([s.model_resamples for s in self.steps], dtype=np.float64)

    @property
    def max_action_diff(self) -> float:
        return max((max(s.action_diff.values(), default=0.0) for s in self.steps), default=0.0)

    @property
    def max_eef_distance(self) -> float:
        return max((s.eef_distance for s in self.steps), default=0.0)

    def summary(self) -> dict[str, Any]:
        return {
            "steps": len(self.steps),
            "divergence_step": self.divergence_step,
            "action_divergence_step": self.action_divergence_step,
            "action_divergence_per_key": dict(self.action_divergence_per_key),
            "max_action_diff": self.max_action_diff,
            "max_action_diff_per_key": self.max_action_diff_per_key,
            "max_eef_distance": self.max_eef_distance,
            "success_model": any(s.success_model for s in self.steps),
            "success_replay": any(s.success_replay for s in self.steps),
            "demo_length": self.demo_length,
            "demo_split": self.demo_split,
            "policy_seed": (self.config.get("action_options") or {}).get("seed"),
            **{f"model_{k}": v for k, v in self.model_smoothness.to_json().items()},
            "seconds": self.seconds,
        }

    @property
    def model_smoothness(self) -> Smoothness:
        """J_B and J_I of the model side's executed actions (see :mod:`policyserve.eval.smoothness`)."""
        actions = np.array([s.model_action for s in self.steps], dtype=np.float64).reshape(len(self.steps), -1)
        return smoothness(actions, [s.model_source for s in self.steps])

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(), "first_obs_diff": self.first_obs_diff, "action_keys": self.action_keys,
                "action_dims": self.action_dims, "config": self.config, "files": self.files,
                "steps": [asdict(s) for s in self.steps]}

    def save_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path


def resolve_env(config: ComparisonConfig, demos: DemoFile) -> EnvConfig:
    """``config.env`` checked against the task and camera size ``demos`` records, or built from them."""
    from dataclasses import replace

    env = config.env or EnvConfig()
    task, size = demo_env_settings(demos, None if config.env is None else env.task,
                                   None if config.env is None else env.camera_size)
    return replace(env, task=task, sim=replace(env.sim, camera_size=size or env.camera_size))


class _Side:
    """One policy driving env ``env_id`` of the comparison's two envs through a driver; the env's success."""

    def __init__(self, name: str, policy: BasePolicy, envs: EnvBatch, env_id: int,
                 driver_config: DriverConfig, rows: int = 1) -> None:
        self.name, self.policy, self.envs, self.env_id, self.rows = name, policy, envs, env_id, rows
        try:
            self.driver = PolicyDriver(policy, rows, driver_config,
                                       action_dim=int(envs.envs[env_id].action_space.shape[0]))
        except ConfigError as exc:
            raise ModalityMismatchError(f"{name} server's modality config is not usable: {exc}") from exc
        self.keys = self.driver.adapter.resolved.env_keys()
        self.success = False

    @property
    def obs(self) -> dict[str, Any]:
        """The env's latest observation."""
        return self.envs.last[self.env_id]

    def start(self, state: dict[str, Any], reset_options: dict[str, Any], seed: int) -> None:
        """Restore the env to ``state`` and reset the policy with ``reset_options`` before its first action
        (``seed``: the episode's, which keys the policy's sampling noise under a base policy seed; resample row
        j gets ``seed + (j << 32)``, apart from every episode's)."""
        self.success = bool(self.envs.reset(self.env_id, state=state).get("success", False))
        try:
            self.driver.adapter.check_env_observation(self.obs)
        except ValidationError as exc:
            raise ModalityMismatchError(f"{self.name} server's modality config does not match the env: {exc}") from exc
        self.driver.reset(None, reset_options, seeds=[seed + (j << 32) for j in range(self.rows)])

    def next_action(self) -> np.ndarray:
        """(rows, A) actions for the env's latest observation: row 0 is executed, the others are resamples."""
        obs = self.envs.observation(self.keys, [self.env_id])
        if self.rows > 1:
            obs = {k: v * self.rows if isinstance(v, list) else np.repeat(np.asarray(v), self.rows, axis=0)
                   for k, v in obs.items()}
        try:
            return np.asarray(self.driver.act(obs))
        except ValidationError as exc:
            raise ModalityMismatchError(f"{self.name} server's actions do not match the env: {exc}") from exc

    @property
    def serves_replay(self) -> bool:
        """Whether the policy's latest reply says ``"replay": True``."""
        return self.driver.last_info.get("replay") is True

    @property
    def where(self) -> str:
        return str(getattr(self.policy, "address", type(self.policy).__name__))

    def step(self, action: np.ndarray) -> None:
        _, _, _, info = self.envs.step(self.env_id, action)
        self.success = bool(info.get("success", False))

    def close(self) -> None:
        self.driver.close()


def _first(values: list[float], threshold: float) -> int | None:
    return next((i for i, v in enumerate(values) if v > threshold), None)


def _check_roles(model: _Side, replay: _Side) -> None:
    """The replay policy's replies must say ``"replay": True`` and the model policy's must not (both sides have
    asked once, the replay first, so a replay given as the model too gets its model-side rows last)."""
    if model.serves_replay and not replay.serves_replay:
        raise PolicyRoleError(f"the model and replay servers are swapped: the replay policy ({replay.where}) is not a "
                              f"replay and the model policy ({model.where}) is one (its replies say 'replay': True)")
    if not replay.serves_replay:
        raise PolicyRoleError(f"the replay policy ({replay.where}) is not a replay: its replies do not say "
                              "'replay': True (is it a replay server?)")
    if model.serves_replay:
        raise PolicyRoleError(f"the model policy ({model.where}) serves a replay (its replies say 'replay': True); "
                              "compare a model against the replay")


def run_comparison(model: BasePolicy, replay: BasePolicy, config: ComparisonConfig,
                   envs: tuple[Any, Any] | None = None) -> ComparisonResult:
    """Run the comparison; writes traces/figure/video under ``config.output_dir`` when set."""
    from dataclasses import replace

    demos = DemoFile(config.hdf5_path)
    length = demos.check_step(config.demo_index, config.start_step)
    config = replace(config, env=resolve_env(config, demos))
    assert config.env is not None
    max_steps = config.max_steps or (length - config.start_step)
    replay_config = DriverConfig(n_action_steps=1, key_map=config.driver.key_map)
    video_keys = [k for policy in (model, replay) for k in policy.get_modality_config()["video"].modality_keys]
    own_envs = envs is None
    if envs is None:
        batch = make_envs(config.env, 2, video_keys=video_keys, key_map=config.driver.key_map,
                          videos=config.video and bool(config.output_dir), max_episode_steps=max_steps + 1,
                          terminate_on_success=False)
    else:
        batch = EnvBatch(list(envs))
    started = time.perf_counter()
    writer: VideoWriter | None = None
    out = Path(config.output_dir) if config.output_dir else None
    sides: list[_Side] = []
    try:
        model_config = config.driver
        if own_envs and not model_config.hold_zero_dims:  # our Franka envs: dims 0-5 are deltas
            model_config = replace(model_config, hold_zero_dims=FRANKA_DELTA_DIMS)
        if config.noise_samples < 0:
            raise ConfigError(f"noise_samples must be >= 0, got {config.noise_samples}")
        sides.append(_Side("model", model, batch, 0, model_config, rows=1 + config.noise_samples))
        sides.append(_Side("replay", replay, batch, 1, replay_config))
        state = demos.state(config.demo_index, config.start_step)
        reset_options = demo_reset_options(config.demo_index, config.start_step)
        for side in sides:
            side.start(state, reset_options, seed=config.demo_index)
        first_obs_diff = observation_diff(sides[0].obs, demos.observation(config.demo_index, config.start_step))
        if out is not None and config.video:
            writer = VideoWriter(out / "comparison.mp4", fps=config.fps)
        records: list[StepRecord] = []
        split: Any = None
        bar = None
        if config.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=max_steps, desc="compare", unit="step")
        try:
            for t in range(max_steps):
                rows = [side.next_action() for side in sides[::-1]][::-1]  # the replay first: see _check_roles
                actions = [r[0] for r in rows]
                if t == 0:
                    _check_roles(*sides)
                    check_replay_identity(demos, config.demo_index, config.start_step, sides[1].driver.last_info,
                                          actions[1], sides[1].where)
                    split = sides[1].driver.last_info.get("demo_split")
                    warn_camera_size(config.env.camera_size, model, sides[0].driver.reset_info)
                eefs = [np.asarray(side.obs["eef_pos"], dtype=np.float64) for side in sides]
                _write_frame(writer, sides, config, t)
                for side, action in zip(sides, actions):
                    side.step(action)
                records.append(_record(t, config.start_step, actions, eefs, sides, rows[0][1:]))
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        _write_frame(writer, sides, config, max_steps)
        dims = dict(sides[1].driver.adapter.action_dims or sides[0].driver.adapter.action_dims or {})
    finally:
        if writer is not None:
            writer.close()
        for side in sides:
            side.close()
        if own_envs:
            batch.close()
    result = ComparisonResult(
        records, list(dims), dims, _first([r.eef_distance for r in records], config.eef_threshold),
        None, config_dict(config), seconds=time.perf_counter() - started,
        first_obs_diff=first_obs_diff, demo_length=length, demo_split=split if isinstance(split, str) else None,
    )
    result.action_divergence_per_key = divergence_steps(
        np.array([r.model_action for r in records], dtype=np.float64),
        np.array([r.replay_action for r in records], dtype=np.float64), dims, config.action_threshold,
        config.action_window, resamples=result.model_resamples)
    result.action_divergence_step = first_step(result.action_divergence_per_key)
    if out is not None:
        result.files = save_outputs(result, out)
        if writer is not None and writer.num_frames:
            result.files["video"] = str(writer.path)
        result.save_json(out / "comparison.json")
    return result


def observation_diff(obs: dict[str, Any], recorded: dict[str, np.ndarray]) -> dict[str, float | None]:
    """Max |obs - recorded| per recorded key the env also has; None where the shapes differ."""
    from ..sim.recorder import obs_max_abs_diff

    diffs: dict[str, float | None] = {}
    for key in recorded:
        if key in obs:
            try:
                diffs.update(obs_max_abs_diff({key: obs[key]}, {key: recorded[key]}))
            except ValueError:
                diffs[key] = None
    return diffs


def _record(t: int, start: int, actions: list[np.ndarray], eefs: list[np.ndarray], sides: list[_Side],
            resamples: np.ndarray) -> StepRecord:
    dims = sides[1].driver.adapter.action_dims or {}
    model = np.asarray(actions[0], np.float64)
    diff = max_diff_per_key(model[None], np.asarray(actions[1], np.float64)[None], dims)
    # max_diff_per_key takes the max over its rows: the resamples stacked as rows against the model action
    noise = max_diff_per_key(np.broadcast_to(model, np.shape(resamples)), resamples, dims) if len(resamples) else {}
    return StepRecord(
        t, start + t, [float(v) for v in actions[0]], [float(v) for v in actions[1]], diff,
        [float(v) for v in eefs[0]], [float(v) for v in eefs[1]], float(np.linalg.norm(eefs[0] - eefs[1])),
        sides[0].success, sides[1].success, sides[0].driver.last_sources[0],
        [[float(v) for v in r] for r in resamples], noise,
    )


def _write_frame(writer: VideoWriter | None, sides: list[_Side], config: ComparisonConfig, t: int) -> None:
    if writer is None:
        return
    images = [side.obs[c] for side in sides for c in config.env.camera_names if c in side.obs]
    if images:
        text = [f"left: model | right: replay  (demo {config.demo_index}, step {config.start_step + t})",
                f"success model {int(sides[0].success)} replay {int(sides[1].success)}"]
        writer.write(compose_frame(images, text))


def save_outputs(result: ComparisonResult, out: str | Path) -> dict[str, str]:
    """Write ``traces.csv`` and ``comparison.png`` under ``out``; returns their paths by kind."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out / "comparison.json"), "csv": str(out / "traces.csv"), "plot": str(out / "comparison.png")}
    _write_csv(result, out / "traces.csv")
    plot_comparison(result, out / "comparison.png")
    return files


def _write_csv(result: ComparisonResult, path: Path) -> None:
    n = len(result.steps[0].model_action) if result.steps else 0
    diff_keys = list(result.steps[0].action_diff) if result.steps else []
    noise_keys = list(result.steps[0].model_noise) if result.steps else []
    header = ["step", "demo_step", *[f"model_a{i}" for i in range(n)], *[f"replay_a{i}" for i in range(n)],
              *[f"diff_{k}" for k in diff_keys], *[f"model_noise_{k}" for k in noise_keys], "eef_model_x", "eef_model_y", "eef_model_z",
              "eef_replay_x", "eef_replay_y", "eef_replay_z", "eef_distance", "success_model", "success_replay"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for s in result.steps:
            w.writerow([s.step, s.demo_step, *s.model_action, *s.replay_action,
                        *[s.action_diff[k] for k in diff_keys], *[s.model_noise[k] for k in noise_keys], *s.eef_model, *s.eef_replay, s.eef_distance,
                        int(s.success_model), int(s.success_replay)])


def plot_comparison(result: ComparisonResult, path: str | Path) -> None:
    """Figure: one panel per action dimension and eef axis (model solid, replay dashed), divergence marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([s.step for s in result.steps])
    model = np.array([s.model_action for s in result.steps])
    replay = np.array([s.replay_action for s in result.steps])
    eef_m = np.array([s.eef_model for s in result.steps])
    eef_r = np.array([s.eef_replay for s in result.steps])
    n_act = model.shape[1] if model.ndim == 2 else 0
    names = [f"{k}[{i}]" for k, d in result.action_dims.items() for i in range(d)] or [f"a{i}" for i in range(n_act)]
    panels = n_act + 4
    cols = 4
    rows = -(-panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.4 * rows), squeeze=False, sharex=True)
    flat = axes.ravel()
    series = [(names[i], model[:, i], replay[:, i]) for i in range(n_act)]
    series += [(f"eef {ax} (m)", eef_m[:, j], eef_r[:, j]) for j, ax in enumerate("xyz")] if len(eef_m) else []
    for ax, (name, m, r) in zip(flat, series):
        ax.plot(steps, m, label="model", color="tab:blue")
        ax.plot(steps, r, "--", label="replay", color="tab:orange")
        ax.set_title(name, fontsize=9)
    dist_ax = flat[len(series)]
    dist_ax.plot(steps, [s.eef_distance for s in result.steps], color="tab:red", label="eef distance")
    dist_ax.axhline(result.config.get("eef_threshold", 0.0), color="gray", lw=0.8, ls=":",
                    label=f"divergence threshold {result.config.get('eef_threshold', 0.0):g} m")
    dist_ax.set_title("eef distance model-replay (m)", fontsize=9)
    used = flat[: len(series) + 1]
    for ax in used:
        if result.divergence_step is not None:
            ax.axvline(result.divergence_step, color="red", lw=1.0, ls="-.", label="eef divergence")
        if result.action_divergence_step is not None:
            ax.axvline(result.action_divergence_step, color="purple", lw=0.8, ls=":", label="action divergence")
    start = result.config.get("start_step", 0)
    for i, ax in enumerate(used):
        if i + cols >= len(used):  # bottom panel of its column
            ax.set_xlabel(f"step since demo step {start}", fontsize=8)
            ax.xaxis.set_tick_params(labelbottom=True)
    for ax in flat[len(series) + 1:]:
        ax.axis("off")
    flat[0].legend(fontsize=8)
    dist_ax.legend(fontsize=7)
    div = "none" if result.divergence_step is None else str(result.divergence_step)
    adiv = "none" if result.action_divergence_step is None else str(result.action_divergence_step)
    cfg: Mapping[str, Any] = result.config
    fig.suptitle(f"model vs replay: demo {cfg.get('demo_index')} from step {cfg.get('start_step')} | eef divergence "
                 f"step {div} (red) | action divergence step {adiv} (purple)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
