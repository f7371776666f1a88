"""Rollout, comparison and demo against real servers and real MuJoCo envs (small cameras, few steps)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("robosuite")
pytest.importorskip("h5py")

from policyserve.cli.main import main as cli_main  # noqa: E402
from policyserve.errors import ConfigError  # noqa: E402
from policyserve.client.driver import DriverConfig  # noqa: E402
from policyserve.eval.compare import (  # noqa: E402
    ComparisonConfig, ModalityMismatchError, PolicyRoleError, run_comparison,
)
from policyserve.eval.envs import EnvConfig  # noqa: E402
from policyserve.sim.envs import FrankaEnvConfig  # noqa: E402
from policyserve.eval.rollout import RolloutConfig, run_rollout  # noqa: E402
from policyserve.launch import free_port  # noqa: E402
from policyserve.client.connect import ServerUnavailableError, connect_policy  # noqa: E402
from policyserve.client.policy_client import PolicyClient  # noqa: E402
from policyserve.policies.base import ActionRequest, PolicyWrapper  # noqa: E402
from policyserve.policies.constant import ConstantPolicy  # noqa: E402
from policyserve.registry import get_embodiment_spec  # noqa: E402
from policyserve.types import ModalityConfig, ModalityDims  # noqa: E402

pytestmark = pytest.mark.sim
SIZE = (32, 32)


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    """One recorded scripted lift demo and its LeRobot dataset."""
    from policyserve.data.hdf5_to_lerobot import convert_hdf5_to_lerobot
    from policyserve.sim.recorder import record_demos

    root = tmp_path_factory.mktemp("demos")
    hdf5 = root / "lift.hdf5"
    summary = record_demos("lift", 1, hdf5, camera_size=SIZE, seed=0, max_episode_steps=120, progress=False)
    assert summary["demos"] == 1
    convert_hdf5_to_lerobot(hdf5, root / "dataset", progress=False)
    return hdf5, root / "dataset"


def replay(dataset, execution_horizon=1):
    from policyserve.policies.replay import make_replay_policy

    return make_replay_policy(dataset, execution_horizon, embodiment_tag="franka_panda")


ENV = EnvConfig(task="lift", sim=FrankaEnvConfig(camera_size=SIZE))


class Demonstrator(PolicyWrapper):
    """A "model" that acts like the demo (a replay behind it, one cursor per client) but, like any model, does
    not say it replays."""

    def __init__(self, policy):
        super().__init__(policy, strict=False)
        self.client = ""

    def serve_reset(self, options=None, client=""):
        self.client = client
        return self.reset(options)

    def serve_batch(self, requests):
        outcomes = []
        for request in requests:
            self.client = request.client
            outcomes.append(self._outcome(lambda: self.get_action(request.observation, request.options)))
        return outcomes

    def reset(self, options=None):
        self.policy.serve_reset(options, self.client)
        return {}

    def _get_action(self, observation, options=None):
        outcome = self.policy.serve_batch([ActionRequest(observation, options, self.client)])[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome[0], {}


class PerturbedPolicy(Demonstrator):
    """A demonstrator whose arm action gets +0.5 on axis 0 from its ``after``-th get_action on."""

    def __init__(self, policy, after):
        super().__init__(policy)
        self.after, self.calls = after, 0

    def reset(self, options=None):
        self.calls = 0
        return super().reset(options)

    def _get_action(self, observation, options=None):
        action, info = super()._get_action(observation, options)
        if self.calls >= self.after:
            action["arm"] = action["arm"].copy()
            action["arm"][..., 0] += 0.5
        self.calls += 1
        return action, info


def test_rollout_replaying_ground_truth_from_the_demo_state_succeeds(demos, serve, tmp_path):
    hdf5, dataset = demos
    served = serve(replay(dataset, execution_horizon=4))
    config = RolloutConfig(env=ENV, driver=DriverConfig(n_action_steps=4), n_episodes=1, n_envs=1,
                           max_episode_steps=120, hdf5_path=str(hdf5), demo_indices=[0],
                           video_dir=str(tmp_path / "v"), progress=False)
    report = run_rollout(served.client, config, report_path=tmp_path / "report.json")
    assert report.episodes[0].success and report.success_rate == 1.0
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["success_rate"] == 1.0 and data["ci95"][1] == 1.0 and data["config"]["n_action_steps"] == 4
    assert set(data["episodes"][0]) >= {"episode", "seed", "success", "steps", "return"}
    video = report.episodes[0].video
    assert video and video.endswith("_s1.mp4") and os.path.getsize(video) > 0
    from policyserve.data.video import decode_video

    frames = decode_video(video)
    assert len(frames) == report.episodes[0].steps + 1 and frames.shape[2] >= 2 * 128  # two cameras side by side


def test_success_rate_identical_for_one_and_two_envs_with_a_deterministic_policy():
    from policyserve.sim.scripted import make_scripted_policy

    outcomes = []
    for n_envs in (1, 2):
        config = RolloutConfig(env=EnvConfig(task="lift"), driver=DriverConfig(n_action_steps=1), n_episodes=3,
                               n_envs=n_envs, max_episode_steps=70, seed=3, progress=False)
        report = run_rollout(make_scripted_policy("lift"), config)
        outcomes.append([(e.episode, e.seed, e.success, e.steps, round(e.reward, 6)) for e in report.episodes])
    assert outcomes[0] == outcomes[1]
    assert len(outcomes[0]) == 3 and any(o[2] for o in outcomes[0])


def test_compare_with_a_model_acting_like_the_demo_has_zero_difference(demos, serve, tmp_path):
    hdf5, dataset = demos
    model, rep = serve(Demonstrator(replay(dataset))), serve(replay(dataset))
    result = run_comparison(model.client, rep.client, ComparisonConfig(
        env=ENV, hdf5_path=str(hdf5), demo_index=0, start_step=3, max_steps=25,
        output_dir=str(tmp_path / "cmp"), progress=False))
    assert len(result.steps) == 25 and result.steps[0].demo_step == 3
    assert result.max_action_diff == 0.0 and result.max_eef_distance == 0.0
    assert result.divergence_step is None and result.action_divergence_step is None
    assert all(s.eef_model == s.eef_replay for s in result.steps)
    assert set(result.steps[0].action_diff) == {"arm", "gripper"}
    for kind in ("json", "csv", "plot", "video"):
        assert os.path.getsize(result.files[kind]) > 0
    lines = open(result.files["csv"]).read().splitlines()
    assert len(lines) == 26 and lines[0].startswith("step,demo_step,model_a0")
    # the model saw exactly the demo's recorded observation at start_step, images included (exact restore)
    diff = json.loads(open(result.files["json"]).read())["first_obs_diff"]
    assert {"eef_pos", "eef_quat", "gripper_pos", "table_cam", "wrist_cam"} <= set(diff)
    assert all(v == 0.0 for v in diff.values()), diff


@pytest.mark.parametrize("horizon", [1, 4, 16])
def test_compare_follows_the_replay_server_whatever_its_execution_horizon(demos, serve, horizon):
    hdf5, dataset = demos
    model, rep = serve(Demonstrator(replay(dataset))), serve(replay(dataset, execution_horizon=horizon))
    config = ComparisonConfig(env=ENV, hdf5_path=str(hdf5), start_step=2, max_steps=20, progress=False)
    result = run_comparison(model.client, rep.client, config)
    assert len(result.steps) == 20 and result.max_action_diff == 0.0 and result.max_eef_distance == 0.0


def test_compare_rejects_swapped_model_and_replay_ports(demos, serve, tmp_path, capsys):
    hdf5, dataset = demos
    model, rep = serve(Demonstrator(replay(dataset))), serve(replay(dataset))
    config = ComparisonConfig(env=ENV, hdf5_path=str(hdf5), max_steps=5, progress=False,
                              output_dir=str(tmp_path / "swapped"))
    with pytest.raises(PolicyRoleError, match=rf"swapped: the replay policy \(tcp://127.0.0.1:{model.port}\) is not "
                                              rf"a replay and the model policy \(tcp://127.0.0.1:{rep.port}\) is one"):
        run_comparison(rep.client, model.client, config)
    assert not (tmp_path / "swapped").exists()  # no mislabelled report
    # one client each (a replay keeps one cursor per client, and the model side asks for 1 + noise_samples rows)
    fresh = lambda served: PolicyClient("127.0.0.1", served.port, timeout_ms=20000)  # noqa: E731
    with pytest.raises(PolicyRoleError, match=rf"model policy \(tcp://127.0.0.1:{rep.port}\) serves a replay"):
        run_comparison(fresh(rep), fresh(rep), config)
    with pytest.raises(PolicyRoleError, match=rf"replay policy \(tcp://127.0.0.1:{model.port}\) is not a replay"):
        run_comparison(fresh(model), fresh(model), config)
    code = cli_main(["compare", "--task", "lift", "--hdf5-path", str(hdf5), "--model-port", str(rep.port),
                     "--replay-port", str(model.port), "--camera-size", "32", "--max-steps", "5",
                     "--output", str(tmp_path / "cli"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "servers are swapped" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "cli").exists()
    assert model.client.ping() and rep.client.ping()  # both servers keep serving
    result = run_comparison(fresh(model), fresh(rep), config)  # the right order still works
    assert result.max_action_diff == 0.0


def test_compare_with_a_perturbed_policy_reports_the_divergence_step(demos, serve):
    hdf5, dataset = demos
    model, rep = serve(PerturbedPolicy(replay(dataset), after=5)), serve(replay(dataset))
    result = run_comparison(model.client, rep.client, ComparisonConfig(
        env=ENV, hdf5_path=str(hdf5), max_steps=20, eef_threshold=0.005, progress=False))
    assert result.action_divergence_step == 5
    assert all(s.action_diff["gripper"] == 0.0 for s in result.steps)
    assert result.steps[5].action_diff["arm"] == pytest.approx(0.5, abs=1e-5)
    assert result.divergence_step is not None and 5 < result.divergence_step < 20


def test_compare_errors_for_bad_demo_index_and_start_step(demos, serve, capsys):
    hdf5, dataset = demos
    with pytest.raises(ConfigError, match=r"demo index 3 is out of range: .* demo indices 0..0 \(1 demos\)"):
        run_comparison(None, None, ComparisonConfig(env=ENV, hdf5_path=str(hdf5), demo_index=3))
    with pytest.raises(ConfigError, match=r"start step 999 is out of range for demo_0 .*valid start steps are 0\.\."):
        run_comparison(None, None, ComparisonConfig(env=ENV, hdf5_path=str(hdf5), start_step=999))
    code = cli_main(["compare", "--task", "lift", "--hdf5-path", str(hdf5), "--demo-index", "7", "--quiet"])
    assert code == 2 and "demo index 7 is out of range" in capsys.readouterr().err


def test_cli_reports_a_server_that_is_down(demos, capsys):
    hdf5, _ = demos
    port = free_port()
    code = cli_main(["compare", "--task", "lift", "--hdf5-path", str(hdf5), "--model-port", str(port),
                     "--replay-port", str(port), "--timeout-ms", "500", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and f"no model server answering at tcp://127.0.0.1:{port}" in err
    code = cli_main(["rollout", "--port", str(port), "--n-episodes", "1", "--quiet"])
    assert code == 2 and "no policy server answering" in capsys.readouterr().err
    with pytest.raises(ServerUnavailableError, match="replay server"):
        connect_policy("127.0.0.1", port, ping_timeout_ms=300, role="replay")


def test_modality_config_mismatch_names_the_key(demos, serve):
    hdf5, dataset = demos
    spec = get_embodiment_spec("franka_panda")
    configs = dict(spec.modality_configs)
    configs["state"] = ModalityConfig([0], ["eef_pos", "joint_torque"])
    wrong_state = serve(ConstantPolicy(configs, spec.dims, strict=False))
    rep = serve(replay(dataset))
    cfg = ComparisonConfig(env=ENV, hdf5_path=str(hdf5), max_steps=2, progress=False)
    with pytest.raises(ModalityMismatchError, match=r"model server's modality config does not match.*joint_torque"):
        run_comparison(wrong_state.client, rep.client, cfg)
    wrong_dims = serve(ConstantPolicy(spec.modality_configs, ModalityDims(action={"arm": 6, "gripper": 2})))
    with pytest.raises(ModalityMismatchError, match=r"model server's actions .*arm\(6\) \+ gripper\(2\) = 8"):
        run_comparison(wrong_dims.client, rep.client, cfg)


def test_cli_rollout_with_local_scripted_policy_writes_a_report(tmp_path, capsys):
    report = tmp_path / "r.json"
    code = cli_main(["rollout", "--task", "lift", "--policy", "scripted", "--n-episodes", "2", "--n-envs", "2",
                     "--n-action-steps", "1", "--max-episode-steps", "60", "--report", str(report), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and "success rate:" in out and "95% CI" in out
    data = json.loads(report.read_text())
    assert data["n_episodes"] == 2 and [e["episode"] for e in data["episodes"]] == [0, 1]
    assert np.isclose(data["mean_return"], np.mean([e["return"] for e in data["episodes"]]))


@pytest.mark.slow
def test_demo_command_runs_end_to_end_and_stops_its_servers(tmp_path, capsys):
    out = tmp_path / "demo"
    code = cli_main(["demo", "--output", str(out), "--n-demos", "1", "--camera-size", "32", "--eval-episodes", "1",
                     "--eval-envs", "1", "--max-episode-steps", "60", "--model-steps", "0", "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    summary = json.loads((out / "summary.json").read_text())
    for key in ("comparison_plot", "comparison_video", "comparison_csv", "rollout_report"):
        assert os.path.getsize(summary["files"][key]) > 0
        assert summary["files"][key] in printed
    assert summary["comparison"]["steps"] > 0 and summary["evaluation"]["success_rate"] in (0.0, 1.0)
