"""Results you can trust: the demo-file reader, replay identity checks, strict replay inputs and data defaults,
each sent the mismatched or bad input (real files, real replay servers on loopback)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest

from policyserve.data.hdf5_to_lerobot import convert_hdf5_to_lerobot
from policyserve.data.lerobot import LeRobotDataset
from policyserve.data.lerobot_writer import LeRobotWriter
from policyserve.errors import ConfigError, ServerError
from policyserve.eval.identity import (
    CameraSizeWarning, IdentityError, camera_size_warning, check_replay_identity, demo_env_settings,
    demo_reset_options, warn_camera_size,
)
from policyserve.policies.constant import ConstantPolicy
from policyserve.policies.replay import RESET_OPTIONS, ReplayError, make_replay_policy
from policyserve.data.demos import DemoFile, DemoFileError
from policyserve.registry import get_embodiment_spec
from policyserve.types import ModalityDims
from test_data_convert import write_robomimic

GAP = {0: 9, 5: 7, 6: 11}  # demo_0, demo_5, demo_6 -> episodes 0, 1, 2
SPEC = get_embodiment_spec("franka_panda")
ENV_ARGS = {"env_name": "Lift", "task": "lift", "env_kwargs": {"camera_size": [32, 48], "camera_names": ["table_cam"]}}


def _with_env_args(path: Path, env_args: dict) -> Path:
    with h5py.File(path, "a") as f:
        f["data"].attrs["env_args"] = json.dumps(env_args)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``gap.hdf5`` and its dataset; ``other.hdf5`` (other demos) and its dataset; a same-named copy of
    gap.hdf5 elsewhere and one with other actions."""
    root = tmp_path_factory.mktemp("trust")
    write_robomimic(root / "gap.hdf5", GAP)
    _with_env_args(root / "gap.hdf5", ENV_ARGS)
    convert_hdf5_to_lerobot(root / "gap.hdf5", root / "gap_ds", progress=False)
    write_robomimic(root / "other.hdf5", {0: 12, 5: 7})
    convert_hdf5_to_lerobot(root / "other.hdf5", root / "other_ds", progress=False)
    (root / "copy").mkdir()
    shutil.copy(root / "gap.hdf5", root / "copy" / "gap.hdf5")
    (root / "changed").mkdir()
    shutil.copy(root / "gap.hdf5", root / "changed" / "gap.hdf5")
    with h5py.File(root / "changed" / "gap.hdf5", "a") as f:
        f["data/demo_5/actions"][0] += 0.25
    return {"gap": root / "gap.hdf5", "gap_ds": root / "gap_ds", "other": root / "other.hdf5",
            "other_ds": root / "other_ds", "copy": root / "copy" / "gap.hdf5",
            "changed": root / "changed" / "gap.hdf5"}


# ------------------------------------------------------------------------------------------------ demo file reader
def test_demo_file_reads_indices_lengths_and_env_args(files, tmp_path: Path) -> None:
    demos = DemoFile(files["gap"])
    assert demos.indices == [0, 5, 6] and [demos.length(n) for n in demos.indices] == [9, 7, 11]
    assert demos.task == "lift" and demos.camera_size == (32, 48) and demos.camera_names == ("table_cam",)
    assert demos.task_text == "lift the cube"
    assert demos.actions(5, 2, 4).shape == (2, 7)
    assert set(demos.observation(6, 10)) == {"eef_pos", "eef_quat", "gripper_pos", "joint_pos", "table_cam",
                                              "wrist_cam"}
    with pytest.raises(DemoFileError, match=r"demo index 3 is out of range: .*gap.hdf5 has demo indices \[0, 5, 6\]"):
        demos.length(3)
    with pytest.raises(IndexError, match=r"start step 7 is out of range for demo_5 .*valid start steps are 0..6"):
        demos.observation(5, 7)
    with pytest.raises(DemoFileError, match="only demos recorded by policyserve record can be restored"):
        demos.state(0, 0)  # no model_file / gripper_actions: not restorable into the built-in envs
    with pytest.raises(DemoFileError, match="HDF5 demo file not found: .*missing.hdf5"):
        DemoFile(tmp_path / "missing.hdf5")
    (tmp_path / "text.hdf5").write_text("not hdf5")
    with pytest.raises(DemoFileError, match="text.hdf5 is not a readable HDF5 file"):
        DemoFile(tmp_path / "text.hdf5")
    with h5py.File(tmp_path / "bare.hdf5", "w") as f:  # no num_samples attribute, no env_args
        f["data/demo_2/actions"] = np.zeros((4, 7))
    bare = DemoFile(tmp_path / "bare.hdf5")
    assert bare.indices == [2] and bare.length(2) == 4 and bare.env_args == {} and bare.task is None


# ------------------------------------------------------------------------------------------------- replay identity
def _first(served, options: dict) -> tuple[dict, np.ndarray]:
    """Reset the replay, take its first reply: info and the env action the driver would execute (keys in order)."""
    served.client.reset(options)
    action, info = served.client.get_action(None, {"batch_size": 1})
    keys = served.client.get_modality_config()["action"].modality_keys
    return info, np.concatenate([action[k][0, 0] for k in keys])


def test_the_replay_of_this_hdf5_passes_the_identity_check(files, serve) -> None:
    served = serve(make_replay_policy(files["gap_ds"], 1, embodiment_tag="franka_panda"))
    demos = DemoFile(files["gap"])
    for demo in (0, 5, 6):
        info, action = _first(served, demo_reset_options(demo, 2))
        assert info["demo_source"] == str(files["gap"].resolve()) and info["demo_index"] == demo
        check_replay_identity(demos, demo, 2, info, action, "tcp://127.0.0.1:x")
    info, action = _first(served, demo_reset_options(5, 0))
    check_replay_identity(DemoFile(files["copy"]), 5, 0, info, action, "x")  # a copy of the file elsewhere


def test_a_replay_of_another_dataset_is_refused_naming_both_files(files, serve) -> None:
    served = serve(make_replay_policy(files["other_ds"], 1, embodiment_tag="franka_panda"))
    info, action = _first(served, demo_reset_options(5))
    with pytest.raises(IdentityError) as err:
        check_replay_identity(DemoFile(files["gap"]), 5, 0, info, action, f"tcp://127.0.0.1:{served.port}")
    message = str(err.value)
    assert "\n" not in message and str(files["other"].resolve()) in message and str(files["gap"]) in message
    assert f"the replay server tcp://127.0.0.1:{served.port} serves the dataset converted from" in message


def test_a_replay_of_the_wrong_demo_is_refused(files, serve) -> None:
    """The old rollout bug: resetting with episode_index N replays episode N, which is not demo_N with gaps."""
    served = serve(make_replay_policy(files["gap_ds"], 1, embodiment_tag="franka_panda"))
    info, action = _first(served, {"episode_index": 1, "step_index": 0})  # episode 1 holds demo_5, not demo_1
    with pytest.raises(IdentityError, match=r"replays demo_5 of .*gap.hdf5, not demo_1 of .*gap.hdf5"):
        check_replay_identity(DemoFile(files["gap"]), 1, 0, info, action, "x")


def test_a_same_named_file_with_other_actions_is_refused(files, serve) -> None:
    served = serve(make_replay_policy(files["gap_ds"], 1, embodiment_tag="franka_panda"))
    info, action = _first(served, demo_reset_options(5))
    with pytest.raises(IdentityError, match=r"does not replay demo_5 of .*changed/gap.hdf5: its action at step 0 "
                                            r"differs from the recorded one by 0.25"):
        check_replay_identity(DemoFile(files["changed"]), 5, 0, info, action, "x")
    info = dict(info, episode_length=8)
    with pytest.raises(IdentityError, match=r"replays an episode of 8 steps as demo_5 .* demo_5 of .*gap.hdf5 has 7"):
        check_replay_identity(DemoFile(files["copy"]), 5, 0, info, action, "x")


def test_a_replay_without_a_demo_map_is_refused(files, serve, gr1_dataset_path: Path) -> None:
    served = serve(make_replay_policy(gr1_dataset_path, 8))
    served.client.reset({"episode_index": 0})
    info = served.client.get_action(None, {"batch_size": 1})[1]
    assert "demo_source" not in info  # datasets without a demo map answer as before
    with pytest.raises(IdentityError, match=r"serves a dataset without meta/hdf5_demo_map.json .*cannot be checked "
                                            r"against .*gap.hdf5"):
        check_replay_identity(DemoFile(files["gap"]), 0, 0, info, None, "x")


# --------------------------------------------------------------------------------------------- strict replay inputs
def test_unknown_reset_options_are_refused_and_change_nothing(files, serve) -> None:
    served = serve(make_replay_policy(files["gap_ds"], 1, embodiment_tag="franka_panda"))
    served.client.reset(demo_reset_options(6, 3))
    with pytest.raises(ServerError, match=r"unknown reset option\(s\) \['episode'\]; a replay accepts "
                                          r"\['episode_index', 'demo_index', 'step_index', 'env_ids', 'seed'\]"):
        served.client.reset({"episode": 2})
    info = served.client.get_action(None, {"batch_size": 1})[1]
    assert (info["demo_index"], info["current_step"]) == (6, 3)
    assert set(RESET_OPTIONS) >= set(demo_reset_options(0))


def _derived_dataset(path: Path) -> Path:
    """A dataset without meta/modality.json whose info.json declares a camera that has no video files."""
    writer = LeRobotWriter(path, fps=10)
    writer.add_episode(0, {"action": np.zeros((5, 3)), "observation.state": np.zeros((5, 2))}, tasks=["t"])
    writer.finish()
    assert not (path / "meta/modality.json").exists()
    info = json.loads((path / "meta/info.json").read_text())
    info["features"]["observation.images.side"] = {"dtype": "video", "shape": [8, 8, 3]}
    (path / "meta/info.json").write_text(json.dumps(info))
    return path


def test_a_dataset_without_modality_json_says_which_keys_it_derived(tmp_path: Path) -> None:
    _derived_dataset(tmp_path / "ds")
    policy = make_replay_policy(tmp_path / "ds", 1)
    banner = "\n".join(policy.describe())
    assert "DERIVED from meta/info.json features (no meta/modality.json" in banner
    assert "action ['action']" in banner and "state ['state']" in banner
    assert "Cameras left out (no video files): ['side']" in banner
    assert policy.get_modality_config()["video"].modality_keys == []  # no camera without video files is offered
    assert LeRobotDataset(tmp_path / "ds").video_keys == ["side"]


def test_a_complete_dataset_says_its_keys_come_from_modality_json(files) -> None:
    banner = make_replay_policy(files["gap_ds"], 1, embodiment_tag="franka_panda").describe()
    assert "  Keys: from meta/modality.json" in banner
    assert f"  Converted from: {files['gap'].resolve()} (3 demos)" in banner


def test_a_language_list_of_the_wrong_length_is_a_clear_server_error(serve) -> None:
    from helpers import LANG_KEY, franka_observation

    served = serve(ConstantPolicy(SPEC.modality_configs, SPEC.dims))
    obs = franka_observation(batch=2)
    obs["language"][LANG_KEY] = [["lift the cube"]]  # one entry for a batch of two
    with pytest.raises(ServerError, match=r"language\['annotation.human.action.task_description'\]: expected batch "
                                          r"size 2 .* got batch size 1"):
        served.client.get_action(obs)
    assert served.client.get_action(franka_observation(batch=2))[0]  # the server keeps serving


# ----------------------------------------------------------------------------------------------- defaults from data
def test_task_and_camera_size_come_from_the_hdf5(files, tmp_path: Path) -> None:
    demos = DemoFile(files["gap"])
    assert demo_env_settings(demos) == ("lift", (32, 48))
    assert demo_env_settings(demos, "LIFT", (32, 48)) == ("lift", (32, 48))
    with pytest.raises(ConfigError, match=r"task 'stack' conflicts with .*gap.hdf5, recorded with task 'lift'"):
        demo_env_settings(demos, "stack")
    with pytest.raises(ConfigError, match=r"camera_size \(84, 84\) conflicts with .*recorded with camera_size "
                                          r"\(32, 48\)"):
        demo_env_settings(demos, None, (84, 84))
    with h5py.File(tmp_path / "bare.hdf5", "w") as f:
        f["data/demo_0/actions"] = np.zeros((4, 7))
    bare = DemoFile(tmp_path / "bare.hdf5")
    assert demo_env_settings(bare, "stack", (64, 64)) == ("stack", (64, 64))
    with pytest.raises(ConfigError, match="does not record its task .*give the task"):
        demo_env_settings(bare)


def test_camera_size_mismatch_warns_once_naming_both_sizes() -> None:
    assert camera_size_warning((84, 84), {"ego_view": (84, 84)}) is None
    assert camera_size_warning((84, 84), {}) is None
    message = camera_size_warning((128, 128), {"ego_view": (84, 84)})
    assert message and "128x128" in message and "84x84" in message and "aspect" not in message
    assert "changes the aspect ratio" in camera_size_warning((480, 640), {"ego_view": (84, 84)})

    class Declares(ConstantPolicy):
        def get_modality_dims(self) -> ModalityDims:
            return ModalityDims(video={"ego_view": (84, 84)})

    policy = Declares(SPEC.modality_configs, SPEC.dims)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            warn_camera_size((480, 640), policy)
    assert [str(w.message) for w in caught if w.category is CameraSizeWarning] == [
        camera_size_warning((480, 640), {"ego_view": (84, 84)})]


# ----------------------------------------------------------------------------------------------- honest headlines
def _result(hdf5: Path, demo: int, arm_noise: float, gripper_flip_at: int | None, steps: int = 30):
    """A comparison result whose model arm differs from the replay by alternating ``arm_noise`` at every step
    and whose gripper flips from -1 to +1 at ``gripper_flip_at`` (None: never)."""
    from policyserve.eval.compare import ComparisonResult, StepRecord

    records = []
    for t in range(steps):
        replay = [0.1] * 6 + [-1.0]
        model = [v + arm_noise * (-1) ** t for v in replay[:6]]
        model.append(1.0 if gripper_flip_at is not None and t >= gripper_flip_at else -1.0)
        diff = {"arm": max(abs(m - r) for m, r in zip(model[:6], replay[:6])), "gripper": abs(model[6] - replay[6])}
        records.append(StepRecord(t, t, model, replay, diff, [0.0] * 3, [0.0] * 3, 0.0, False, True))
    config = {"hdf5_path": str(hdf5), "demo_index": demo, "action_threshold": 0.1, "eef_threshold": 0.02}
    return ComparisonResult(records, ["arm", "gripper"], {"arm": 6, "gripper": 1}, None, 0, config)


def test_action_divergence_is_reported_per_key_and_ignores_sampling_noise(files) -> None:
    from policyserve.eval.divergence import divergence_steps

    model = np.zeros((20, 7))
    model[:, :6] = 0.15 * (-1) ** np.arange(20)[:, None]  # noise above the threshold at every step, mean ~0
    model[8:, 6] = 2.0  # the gripper flips at step 8 and stays flipped
    assert divergence_steps(model, np.zeros((20, 7)), {"arm": 6, "gripper": 1}, 0.1) == {"arm": None, "gripper": 8}
    assert divergence_steps(model, np.zeros((20, 7)), {"arm": 6, "gripper": 1}, 0.1, window=1)["arm"] == 0
    model[12:, 0] += 0.5  # a real departure of the arm from step 12 on
    assert divergence_steps(model, np.zeros((20, 7)), {"arm": 6, "gripper": 1}, 0.1)["arm"] == 12


def test_the_rule_judges_a_difference_against_the_models_own_resamples() -> None:
    from policyserve.eval.divergence import divergence_steps, noise_margin

    rng = np.random.default_rng(0)
    dims = {"arm": 6, "gripper": 1}
    noisy = lambda: rng.normal(0.0, 0.3, (60, 7))  # noqa: E731 - a model much noisier than the 0.1 threshold
    model, demo_like, resamples = noisy(), noisy(), np.stack([noisy(), noisy()], axis=1)
    assert divergence_steps(model, demo_like, dims, 0.1)["arm"] is not None  # a fixed threshold fires on noise
    assert divergence_steps(model, demo_like, dims, 0.1, resamples=resamples) == {"arm": None, "gripper": None}
    # the model's samples spread by 0.3 around 0; the demo is one more such sample until it departs
    swing = 0.3 * (-1.0) ** np.arange(60)[:, None] * np.ones((60, 7))
    model, resamples = np.zeros((60, 7)), np.stack([swing, -swing], axis=1)
    departed = -swing.copy()
    assert divergence_steps(model, departed, dims, 0.1, resamples=resamples) == {"arm": None, "gripper": None}
    departed[30:, 2] += 1.0  # the arm heads elsewhere from step 30 on
    departed[40:, 6] -= 2.0  # and the gripper does the opposite from step 40 on
    assert divergence_steps(model, departed, dims, 0.1, resamples=resamples) == {"arm": 30, "gripper": 40}
    assert noise_margin(model, resamples, 5).max() == pytest.approx(0.3)
    spike = np.zeros((20, 7))
    spike[5, 0] = 3.0  # one outlier step: not most of the window, whatever its running mean
    assert divergence_steps(spike, np.zeros((20, 7)), dims, 0.1) == {"arm": None, "gripper": None}
    # the margin: largest |model - resample| over the window ahead and the resamples, per dimension
    margin = noise_margin(np.zeros((4, 1)), np.array([[[1.0]], [[0.0]], [[-2.0]], [[0.5]]]).reshape(4, 1, 1), 2)
    assert margin[:, 0].tolist() == [1.0, 2.0, 2.0, 0.5]
    with pytest.raises(ValueError, match=r"resamples must be \(T, J, A\) = \(4, J, 1\), got \(3, 1, 1\)"):
        noise_margin(np.zeros((4, 1)), np.zeros((3, 1, 1)), 2)
    # identical resamples (a deterministic model): the fixed-threshold rule
    assert divergence_steps(model, demo_like, dims, 0.1, resamples=np.stack([model, model], axis=1)) == \
        divergence_steps(model, demo_like, dims, 0.1)


def test_the_aggregate_reports_arm_and_gripper_apart_and_marks_never_diverged_demos(files, tmp_path: Path) -> None:
    from policyserve.eval.compare_all import AggregateComparison, DemoSummary

    rows = [DemoSummary.from_result(0, _result(files["gap"], 0, 0.15, None), None),
            DemoSummary.from_result(5, _result(files["gap"], 5, 0.15, 10), None)]
    assert rows[0].action_divergence_per_key == {"arm": None, "gripper": None}
    assert rows[1].action_divergence_per_key == {"arm": None, "gripper": 10}
    assert rows[1].max_action_diff_per_key == pytest.approx({"arm": 0.15, "gripper": 2.0})
    assert [r.length for r in rows] == [9, 7]  # from the HDF5 file
    rows[1].split = "eval"
    report = AggregateComparison(rows, {"eef_threshold": 0.02, "action_threshold": 0.1}, {})
    line = report.summary_line()
    assert "action divergence (> 0.1 over 5 steps): arm 0, gripper 1 demos" in line and "2.0" not in line
    files_written = report.save(tmp_path)
    header = (tmp_path / "aggregate.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["demo_index", "steps", "divergence_step"]
    assert {"max_action_diff_arm", "max_action_diff_gripper", "action_divergence_step_gripper", "length",
            "split"} <= set(header)
    assert json.loads((tmp_path / "aggregate.json").read_text())["summary"]["action_diverged_per_key"] == {
        "arm": 0, "gripper": 1}
    from policyserve.eval.compare_all import plot_summary

    marked = plot_summary(report, tmp_path / "again.png")
    assert marked == {"never_diverged": [0, 5], "tick_labels": ["0", "5\neval"], "eval_demos": [5]}
    assert Path(files_written["plot"]).stat().st_size > 0


# -------------------------------------------------------------------------------------------- reproducible runs
def _sampling_model(image_size: int = 16):
    """A real flow-matching model policy (one training step on 16x16 frames, resized to ``image_size``):
    unseeded, its actions are random draws."""
    import tempfile

    from policyserve.model.config import TrainConfig
    from policyserve.model.policy import ModelPolicy
    from policyserve.model.synthetic import make_episodes
    from policyserve.model.train import Trainer

    episodes = make_episodes(SPEC.modality_configs, SPEC.dims.state, SPEC.dims.action, n_episodes=2, length=8,
                             image_hw=(16, 16))
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(episodes, SPEC.modality_configs, out, TrainConfig(max_steps=1, batch_size=2, progress=False,
                                                                            resume=False),
                          architecture={"image_size": image_size, "d_model": 32}, embodiment_tag="franka_panda")
        return ModelPolicy(trainer.model, trainer.bundle)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two scripted lift demos recorded at 16x16 (kept even if they fail) as demo_0 and demo_5 (a gap), and
    their LeRobot dataset; ``other.hdf5`` (one other demo) and its dataset next to them."""
    from policyserve.sim.recorder import record_demos

    root = tmp_path_factory.mktemp("recorded")
    record_demos("lift", 2, root / "lift.hdf5", camera_size=(16, 16), seed=0, max_episode_steps=20,
                 keep_failed=True, progress=False)
    with h5py.File(root / "lift.hdf5", "a") as f:
        f.move("data/demo_1", "data/demo_5")
    convert_hdf5_to_lerobot(root / "lift.hdf5", root / "dataset", progress=False)
    record_demos("lift", 1, root / "other.hdf5", camera_size=(16, 16), seed=3, max_episode_steps=25,
                 keep_failed=True, progress=False)
    convert_hdf5_to_lerobot(root / "other.hdf5", root / "other_dataset", progress=False)
    return root / "lift.hdf5", root / "dataset"


@pytest.mark.sim
def test_the_same_rollout_command_gives_the_same_per_episode_results(serve, tmp_path: Path, capsys) -> None:
    from policyserve.cli.main import main as cli_main

    served = serve(_sampling_model())

    def rollout(name: str, *extra: str) -> dict:
        argv = ["rollout", "--port", str(served.port), "--n-episodes", "2", "--n-envs", "2", "--max-episode-steps",
                "8", "--camera-size", "16", "--n-action-steps", "4", "--seed", "7", "--quiet", "--report",
                str(tmp_path / f"{name}.json"), *extra]
        assert cli_main(argv) == 0, capsys.readouterr().err
        return json.loads((tmp_path / f"{name}.json").read_text())

    first, second = rollout("first"), rollout("second")
    assert first["episodes"] == second["episodes"] and [e["seed"] for e in first["episodes"]] == [7, 8]
    assert first["config"]["seed"] == 7 and first["config"]["action_options"] == {"seed": 7}  # the seeds it used


@pytest.mark.sim
def test_the_same_compare_command_gives_the_same_traces_and_none_unseeds(recorded, serve, tmp_path: Path,
                                                                         capsys) -> None:
    from policyserve.cli.main import main as cli_main

    hdf5, dataset = recorded
    model, replay = serve(_sampling_model()), serve(make_replay_policy(dataset, 1, embodiment_tag="franka_panda"))

    def compare(name: str, *extra: str) -> dict:
        argv = ["compare", "--hdf5-path", str(hdf5), "--model-port", str(model.port), "--replay-port",
                str(replay.port), "--max-steps", "4", "--quiet", "--no-video", "--output", str(tmp_path / name), *extra]
        assert cli_main(argv) == 0, capsys.readouterr().err
        return json.loads((tmp_path / name / "comparison.json").read_text())

    first, second = compare("first"), compare("second")
    assert first["steps"] == second["steps"] and first["config"]["action_options"] == {"seed": 0}
    assert first["config"]["task"] == "lift" and first["config"]["camera_size"] == [16, 16]  # from env_args
    unseeded = [compare(f"unseeded{i}", "--policy-seed", "none") for i in range(2)]
    assert unseeded[0]["config"]["action_options"] is None
    assert [s["model_action"] for s in unseeded[0]["steps"]] != [s["model_action"] for s in unseeded[1]["steps"]]


@pytest.mark.sim
def test_compare_draws_the_models_noise_reference_without_changing_what_it_executes(recorded, serve,
                                                                                    tmp_path: Path) -> None:
    from policyserve.eval.compare import ComparisonConfig, run_comparison
    from policyserve.client.driver import DriverConfig

    hdf5, dataset = recorded
    model, replay = serve(_sampling_model()), serve(make_replay_policy(dataset, 1, embodiment_tag="franka_panda"))

    def compare(noise_samples: int):
        return run_comparison(model.client, replay.client, ComparisonConfig(
            driver=DriverConfig(n_action_steps=1, action_options={"seed": 0}), hdf5_path=str(hdf5), max_steps=4,
            noise_samples=noise_samples, progress=False, video=False, output_dir=str(tmp_path / str(noise_samples))))

    with_reference, without = compare(2), compare(0)
    executed = np.array([s.model_action for s in with_reference.steps])
    np.testing.assert_allclose(executed, [s.model_action for s in without.steps], atol=1e-5)  # same row-0 seeds
    resamples = with_reference.model_resamples
    assert resamples is not None and resamples.shape == (4, 2, executed.shape[1])
    assert np.abs(resamples - executed[:, None]).max() > 1e-3  # other seeds: other samples
    assert not np.allclose(resamples[:, 0], resamples[:, 1])
    noise = with_reference.steps[0].model_noise
    assert set(noise) == {"arm", "gripper"} and noise["arm"] == pytest.approx(
        np.abs(resamples[0, :, :6] - executed[0, :6]).max(), abs=1e-6)
    assert without.model_resamples is None and without.steps[0].model_noise == {}
    saved = json.loads((tmp_path / "2" / "comparison.json").read_text())
    assert saved["config"]["noise_samples"] == 2 and len(saved["steps"][0]["model_resamples"]) == 2
    assert "model_noise_arm" in (tmp_path / "2" / "traces.csv").read_text().splitlines()[0]
    with pytest.raises(ConfigError, match="noise_samples must be >= 0, got -1"):
        compare(-1)
    assert model.client.ping() and replay.client.ping()


@pytest.mark.sim
def test_compare_and_rollout_refuse_a_flag_that_conflicts_with_the_hdf5(recorded, tmp_path: Path, capsys) -> None:
    from policyserve.cli.main import main as cli_main

    hdf5, _ = recorded
    out = tmp_path / "out"
    for argv, conflict in ((["compare", "--task", "stack"], "'stack'"),
                           (["compare", "--camera-size", "84"], "(84, 84)"),
                           (["rollout", "--task", "stack", "--demo-indices", "0"], "'stack'")):
        extra = ["--output", str(out)] if argv[0] == "compare" else ["--report", str(out / "r.json")]
        assert cli_main([*argv, "--hdf5-path", str(hdf5), "--quiet", *extra]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and conflict in lines[0], lines
        assert f"conflicts with {hdf5}, recorded with" in lines[0] and "(env_args)" in lines[0]
        assert not out.exists()  # nothing written


# ------------------------------------------------------------------------------ identity checks in compare/rollout
def _rollout_config(hdf5: Path, demos: list[int], **kwargs):
    from policyserve.client.driver import DriverConfig
    from policyserve.eval.envs import EnvConfig
    from policyserve.sim.envs import FrankaEnvConfig
    from policyserve.eval.rollout import RolloutConfig

    return RolloutConfig(env=EnvConfig(task="lift", sim=FrankaEnvConfig(camera_size=(16, 16))),
                         driver=DriverConfig(n_action_steps=4),
                         n_episodes=len(demos), n_envs=len(demos), max_episode_steps=6, hdf5_path=str(hdf5),
                         demo_indices=demos, progress=False, **kwargs)


@pytest.mark.sim
def test_rollout_from_demo_n_replays_demo_n_also_with_gaps(recorded, serve, tmp_path: Path) -> None:
    from policyserve.eval.identity import IdentityError
    from policyserve.eval.rollout import run_rollout

    hdf5, dataset = recorded
    replay = serve(make_replay_policy(dataset, 4, embodiment_tag="franka_panda"))
    report = run_rollout(replay.client, _rollout_config(hdf5, [5, 0]), report_path=tmp_path / "r.json")
    assert [e.demo_index for e in report.episodes] == [5, 0]  # demo_5 is episode 1: found through the demo map
    other = serve(make_replay_policy(hdf5.parent / "other_dataset", 4, embodiment_tag="franka_panda"))
    with pytest.raises(IdentityError, match=rf"serves the dataset converted from {hdf5.parent / 'other.hdf5'}, not "
                                            rf"from {hdf5}"):
        run_rollout(other.client, _rollout_config(hdf5, [0]), report_path=tmp_path / "wrong.json")
    assert not (tmp_path / "wrong.json").exists()


@pytest.mark.sim
def test_compare_refuses_a_replay_of_another_dataset_naming_both_files(recorded, serve, tmp_path: Path,
                                                                      capsys) -> None:
    from policyserve.cli.main import main as cli_main

    hdf5, dataset = recorded
    model = serve(_sampling_model())
    other = serve(make_replay_policy(hdf5.parent / "other_dataset", 1, embodiment_tag="franka_panda"))
    argv = ["compare", "--hdf5-path", str(hdf5), "--model-port", str(model.port), "--replay-port", str(other.port),
            "--max-steps", "3", "--quiet", "--output", str(tmp_path / "cmp")]
    assert cli_main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the replay server tcp://127.0.0.1:"), lines
    assert f"serves the dataset converted from {hdf5.parent / 'other.hdf5'}, not from {hdf5}" in lines[0]
    assert not (tmp_path / "cmp").exists()  # nothing written
    replay = serve(make_replay_policy(dataset, 1, embodiment_tag="franka_panda"))
    argv[argv.index(str(other.port))] = str(replay.port)
    assert cli_main([*argv, "--demo-index", "5", "--no-video"]) == 0  # the right replay server: demo_5 compared
    saved = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert saved["summary"]["demo_length"] == DemoFile(hdf5).length(5)
    assert set(saved["summary"]["action_divergence_per_key"]) == {"arm", "gripper"}


def test_serve_banner_says_a_replay_derived_its_keys(tmp_path: Path) -> None:
    from serve_process import serve_process

    with serve_process("--dataset-path", str(_derived_dataset(tmp_path / "ds"))) as (proc, _):
        banner = proc.banner
    assert "Keys: DERIVED from meta/info.json features (no meta/modality.json" in banner
    assert "Cameras left out (no video files): ['side']" in banner


@pytest.mark.sim
def test_a_camera_size_other_than_the_models_warns_once_naming_both_sizes(serve) -> None:
    from policyserve.client.driver import DriverConfig
    from policyserve.eval.envs import EnvConfig
    from policyserve.sim.envs import FrankaEnvConfig
    from policyserve.eval.rollout import RolloutConfig, run_rollout

    served = serve(_sampling_model())  # trained at 16x16: its reset info declares image_size [16, 16]
    cameras = {k: [16, 16] for k in SPEC.modality_configs["video"].modality_keys}  # the training frames' sizes
    camera = next(iter(cameras))
    assert served.client.reset() == {"image_size": [16, 16], "camera_sizes": cameras}

    def warned(size: tuple[int, int]) -> list[str]:
        config = RolloutConfig(env=EnvConfig(task="lift", sim=FrankaEnvConfig(camera_size=size)),
                               driver=DriverConfig(n_action_steps=4),
                               n_episodes=2, n_envs=1, max_episode_steps=3, progress=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            run_rollout(served.client, config)
        return [str(w.message) for w in caught if w.category is CameraSizeWarning]

    messages = warned((24, 32))
    assert len(messages) == 1, messages  # once per run, not per episode or step
    assert f"renders cameras at 24x32 but the policy declares {camera} at 16x16" in messages[0]
    assert "changes the aspect ratio" in messages[0]
    assert warned((16, 16)) == []
    # trained on 16x16 frames that the network resizes to 32x32: the training frames' size is the one to match
    served = serve(_sampling_model(image_size=32))
    assert served.client.reset() == {"image_size": [32, 32], "camera_sizes": cameras}
    assert warned((16, 16)) == []
    assert [m.split(":")[0] for m in warned((32, 32))] == [
        f"the env renders cameras at 32x32 but the policy declares {camera} at 16x16"]
    from policyserve.eval.identity import declared_camera_sizes  # a checkpoint from before camera_sizes
    assert declared_camera_sizes(served.client, {"image_size": [32, 32]}) == {"every camera": (32, 32)}
