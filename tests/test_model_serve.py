"""`policyserve train` on an on-disk LeRobot dataset, serving the checkpoint, and the GR00T adapter."""

from __future__ import annotations

import dataclasses
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
h5py = pytest.importorskip("h5py")
pytest.importorskip("av")

from policyserve.cli.main import main as cli_main  # noqa: E402
from policyserve.errors import ConfigError  # noqa: E402
from policyserve.model import checkpoint_kind, load_policy  # noqa: E402
from policyserve.model.gr00t_adapter import Gr00tAdapterPolicy  # noqa: E402
from policyserve.model.synthetic import make_episodes  # noqa: E402
from policyserve.registry import get_embodiment_spec  # noqa: E402
from policyserve.types import ModalityConfig  # noqa: E402

pytestmark = pytest.mark.model
torch.set_num_threads(2)
SPEC = get_embodiment_spec("franka_panda")
LANG = "annotation.human.action.task_description"
HDF5_CAMERAS = {"table_cam": "ego_view", "wrist_cam": "wrist_view"}


def write_robomimic_hdf5(path: Path, n_demos: int = 5, length: int = 12) -> None:
    """Synthetic demos in the robomimic layout that ``policyserve convert`` reads."""
    episodes = make_episodes(SPEC.modality_configs, SPEC.dims.state, SPEC.dims.action, n_episodes=n_demos,
                             length=length, image_hw=(32, 32))
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = json.dumps({"env_name": "Lift"})
        for ep in episodes:
            demo = data.create_group(f"demo_{ep.episode_index}")
            for hdf5_key, video_key in HDF5_CAMERAS.items():
                demo.create_dataset(f"obs/{hdf5_key}", data=ep.videos[video_key])
            for key, values in ep.states.items():
                demo.create_dataset(f"obs/{key}", data=values)
            demo.create_dataset("actions", data=np.concatenate([ep.actions["arm"], ep.actions["gripper"]], axis=1))


@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint made by the ``policyserve train`` CLI from a converted on-disk dataset."""
    from policyserve.data.hdf5_to_lerobot import convert_hdf5_to_lerobot

    root = tmp_path_factory.mktemp("cli")
    write_robomimic_hdf5(root / "demos.hdf5")
    convert_hdf5_to_lerobot(root / "demos.hdf5", root / "dataset", task="lift the cube", eval_proportion=0.2,
                            progress=False)
    argv = ["train", "--dataset-path", str(root / "dataset"), "--output-dir", str(root / "out"),
            "--embodiment-tag", "franka_panda", "--max-steps", "4", "--batch-size", "4", "--save-steps", "2",
            "--image-size", "24", "--d-model", "64", "--no-progress", "--num-threads", "2"]
    assert cli_main(argv) == 0
    return root / "out"


def test_train_without_eval_split_holds_out_the_last_episodes(tmp_path: Path) -> None:
    from policyserve.data.hdf5_to_lerobot import convert_hdf5_to_lerobot
    from policyserve.data.lerobot import LeRobotDataset
    from policyserve.model.config import TrainConfig
    from policyserve.model.train import train_from_dataset

    write_robomimic_hdf5(tmp_path / "demos.hdf5", n_demos=5, length=8)
    convert_hdf5_to_lerobot(tmp_path / "demos.hdf5", tmp_path / "dataset", task="lift", eval_proportion=0.0,
                            progress=False)
    assert "eval" not in (LeRobotDataset(tmp_path / "dataset").info.get("splits") or {})
    result = train_from_dataset(tmp_path / "dataset", tmp_path / "out",
                                TrainConfig(max_steps=2, batch_size=2, save_steps=2),
                                embodiment_tag="franka_panda", architecture={"image_size": 16, "d_model": 32})
    info = json.loads((tmp_path / "out" / "config.json").read_text())["training"]
    assert info["eval_episodes"] == [4] and info["train_episodes"] == [0, 1, 2, 3]
    assert result is not None


def test_train_cli_writes_checkpoints_and_resumes(cli_checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    assert (cli_checkpoint / "checkpoint-2").is_dir() and (cli_checkpoint / "checkpoint-4").is_dir()
    assert (cli_checkpoint / "loss_curve.png").is_file()
    config = json.loads((cli_checkpoint / "config.json").read_text())
    assert config["embodiment_tags"] == ["franka_panda"] and config["model"]["image_size"] == 24
    assert config["training"]["eval_episodes"] == [4] and config["training"]["train_episodes"] == [0, 1, 2, 3]
    assert config["text_vocab"][2:] == ["cube", "lift", "the"]
    dataset = config["training"]["dataset"]
    argv = ["train", "--dataset-path", dataset, "--output-dir", str(cli_checkpoint), "--embodiment-tag",
            "franka_panda", "--max-steps", "6", "--batch-size", "4", "--save-steps", "2", "--image-size", "24",
            "--d-model", "64", "--no-progress"]
    capsys.readouterr()
    assert cli_main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 6 and summary["resumed_from"].endswith("checkpoint-4")


def test_train_cli_reports_bad_inputs(cli_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dataset = json.loads((cli_checkpoint / "config.json").read_text())["training"]["dataset"]
    cases = [
        (["--dataset-path", str(tmp_path)], "not a LeRobot dataset"),
        (["--dataset-path", dataset, "--embodiment-tag", "no_such_robot"], "no_such_robot"),
        (["--dataset-path", dataset, "--modality-config-path", str(tmp_path / "missing.json")], "not found"),
        (["--dataset-path", dataset, "--max-steps", "0"], "--max-steps must be >= 1"),
        (["--dataset-path", dataset, "--device", "cuda:7"], "cuda:7"),
    ]
    for extra, message in cases:
        assert cli_main(["train", "--output-dir", str(tmp_path / "o"), "--no-progress", *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra


def test_serve_trained_checkpoint_through_client(cli_checkpoint: Path) -> None:
    from policyserve.client.policy_client import PolicyClient
    from policyserve.serving.server import PolicyServer

    policy = load_policy(cli_checkpoint, embodiment_tag="franka_panda", device="cpu")
    server = PolicyServer(policy, host="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        client = PolicyClient(host="127.0.0.1", port=server.port, timeout_ms=30000)
        try:
            configs = client.get_modality_config()
            assert configs["action"].modality_keys == ["arm", "gripper"]
            rng = np.random.default_rng(0)
            obs = {
                "video": {k: rng.integers(0, 255, (2, 1, 48, 64, 3), dtype=np.uint8) for k in HDF5_CAMERAS.values()},
                "state": {k: rng.normal(size=(2, 1, d)).astype(np.float32) for k, d in SPEC.dims.state.items()},
                "language": {LANG: [["lift the cube"]] * 2},
            }
            action, _ = client.get_action(obs, options={"seed": 1})
            local, _ = policy.get_action(obs, {"seed": 1})
        finally:
            client.close()
    finally:
        server.stop()
    stats = policy.bundle.normalizer.stats["action"]
    for key, dim in SPEC.dims.action.items():
        assert action[key].shape == (2, 16, dim) and action[key].dtype == np.float32
        np.testing.assert_allclose(action[key], local[key], rtol=1e-5, atol=1e-6)
        assert (action[key] >= stats[key].min - 1e-5).all() and (action[key] <= stats[key].max + 1e-5).all()


@pytest.mark.parametrize(
    "files",
    [
        {"config.json": {"model_type": "Gr00tN1d6", "architectures": ["Gr00tN1d6"]}},
        {"config.json": {"architectures": ["GR00T_N1_5"]}},
        {"processor_config.json": {}},
        {"experiment_cfg/metadata.json": {}},
    ],
)
def test_detects_gr00t_checkpoints(tmp_path: Path, files: dict) -> None:
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(json.dumps(content))
    assert checkpoint_kind(tmp_path) == "gr00t"


def test_unknown_directory_is_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConfigError, match="neither a policyserve checkpoint"):
        checkpoint_kind(tmp_path)


def test_gr00t_checkpoint_without_gr00t_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gr00t", None)  # as if not installed, also where it is
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "Gr00tN1d6"}))
    with pytest.raises(ConfigError, match=r"gr00t package is not importable.*pip install"):
        load_policy(tmp_path, embodiment_tag="new_embodiment", device="cuda")


@dataclasses.dataclass
class _Gr00tModalityConfig:
    """Field-for-field copy of gr00t.data.types.ModalityConfig (a dataclass upstream)."""

    delta_indices: list
    modality_keys: list
    sin_cos_embedding_keys: list | None = None
    mean_std_embedding_keys: list | None = None
    action_configs: list | None = None


class _FakeGr00tPolicy:
    """Stands in for gr00t.policy.gr00t_policy.Gr00tPolicy (an external package, not installed here)."""

    def __init__(self, embodiment_tag, model_path, device, strict):
        if embodiment_tag.value != "new_embodiment":
            raise KeyError(embodiment_tag.value)
        self.calls = []
        self.args = (embodiment_tag, model_path, device, strict)

    def get_modality_config(self):
        return {m: _Gr00tModalityConfig(**c.to_json()) for m, c in SPEC.modality_configs.items()}

    def get_action(self, observation, options=None):
        self.calls.append(options)
        batch = len(observation["language"][LANG])
        return {k: np.zeros((batch, 16, d), np.float32) for k, d in SPEC.dims.action.items()}, {"fake": True}

    def reset(self, options=None):
        return {"reset": True}


@pytest.fixture
def fake_gr00t(monkeypatch: pytest.MonkeyPatch) -> None:
    import enum

    tags = types.ModuleType("gr00t.data.embodiment_tags")
    tags.EmbodimentTag = enum.Enum("EmbodimentTag", {"GR1": "gr1", "NEW_EMBODIMENT": "new_embodiment"})
    policy_module = types.ModuleType("gr00t.policy.gr00t_policy")
    policy_module.Gr00tPolicy = _FakeGr00tPolicy
    for name in ("gr00t", "gr00t.data", "gr00t.policy"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "gr00t.data.embodiment_tags", tags)
    monkeypatch.setitem(sys.modules, "gr00t.policy.gr00t_policy", policy_module)


def test_adapter_wraps_gr00t_policy(fake_gr00t: None, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "Gr00tN1d6"}))
    policy = load_policy(tmp_path, device="cuda:0")
    assert isinstance(policy, Gr00tAdapterPolicy)
    tag, model_path, device, strict = policy.policy.args
    assert (tag.value, model_path, device, strict) == ("new_embodiment", str(tmp_path), "cuda:0", True)
    assert isinstance(policy.get_modality_config()["video"], ModalityConfig)
    obs = {
        "video": {k: np.zeros((3, 1, 8, 8, 3), np.uint8) for k in HDF5_CAMERAS.values()},
        "state": {k: np.zeros((3, 1, d), np.float32) for k, d in SPEC.dims.state.items()},
        "language": {LANG: [["lift"]] * 3},
    }
    action, info = policy.get_action(obs, {"seed": 1})
    assert action["arm"].shape == (3, 16, 6) and info == {"fake": True} and policy.policy.calls == [{"seed": 1}]
    assert policy.reset() == {"reset": True}
    with pytest.raises(ConfigError, match="not trained for embodiment 'gr1'"):
        load_policy(tmp_path, embodiment_tag="gr1")
    with pytest.raises(ConfigError, match="does not know embodiment tag 'franka_panda'"):
        load_policy(tmp_path, embodiment_tag="franka_panda")


def test_adapter_merges_requests_from_several_clients_into_one_gr00t_call(fake_gr00t: None, tmp_path: Path) -> None:
    from policyserve.policies.base import ActionRequest

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "Gr00tN1d6"}))
    policy = load_policy(tmp_path)
    assert policy.batchable

    def obs(batch: int) -> dict:
        return {"video": {k: np.zeros((batch, 1, 8, 8, 3), np.uint8) for k in HDF5_CAMERAS.values()},
                "state": {k: np.zeros((batch, 1, d), np.float32) for k, d in SPEC.dims.state.items()},
                "language": {LANG: [["lift"]] * batch}}

    outcomes = policy.serve_batch([ActionRequest(obs(1), None, "a"), ActionRequest(obs(3), None, "b")])
    assert [o[0]["arm"].shape[0] for o in outcomes] == [1, 3]
    assert policy.policy.calls == [None]  # one call to Gr00tPolicy for both clients


def _untrained_model_policy():
    from policyserve.model.config import TrainConfig
    from policyserve.model.policy import ModelPolicy
    from policyserve.model.train import Trainer
    import tempfile

    episodes = make_episodes(SPEC.modality_configs, SPEC.dims.state, SPEC.dims.action, n_episodes=2, length=8,
                             image_hw=(16, 16))
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(episodes, SPEC.modality_configs, out, TrainConfig(max_steps=1, batch_size=2, progress=False,
                                                                            resume=False),
                          architecture={"image_size": 16, "d_model": 32}, embodiment_tag="franka_panda")
        return ModelPolicy(trainer.model, trainer.bundle)


def _model_obs(batch: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"video": {k: rng.integers(0, 255, (batch, 1, 16, 16, 3), dtype=np.uint8) for k in HDF5_CAMERAS.values()},
            "state": {k: rng.normal(size=(batch, 1, d)).astype(np.float32) for k, d in SPEC.dims.state.items()},
            "language": {LANG: [["lift the cube"]] * batch}}


def test_model_merged_call_with_per_request_seeds_equals_separate_calls() -> None:
    from policyserve.policies.base import ActionRequest

    policy = _untrained_model_policy()
    assert policy.batchable and "seed" in policy.row_options
    requests = [ActionRequest(_model_obs(1, 0), {"seed": 1}, "a"), ActionRequest(_model_obs(3, 1), {"seed": 2}, "b"),
                ActionRequest(_model_obs(2, 2), {"seed": 1}, "c")]
    merged = policy.serve_batch(requests)
    for request, (action, _) in zip(requests, merged):
        alone, _ = policy.get_action(request.observation, request.options)
        for key in alone:
            np.testing.assert_allclose(action[key], alone[key], atol=1e-5)
    with pytest.raises(Exception, match="a list of 2 ints"):
        policy.get_action(_model_obs(2, 0), {"seed": [1]})


def test_model_server_merges_clients_with_different_seeds() -> None:
    import threading

    from policyserve import PolicyClient, PolicyServer

    policy = _untrained_model_policy()
    server = PolicyServer(policy, port=0, verbose=False, batch_window_ms=300)
    server.start()
    try:
        results = {}

        def call(i: int) -> None:
            with PolicyClient(port=server.port, timeout_ms=20000) as c:
                results[i] = c._get_action(_model_obs(i + 1, i), {"seed": 10 + i})

        threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(results) == [0, 1, 2]
        assert max(info["server_timing"]["merged_requests"] for _, info in results.values()) == 3
        for i, (action, _) in results.items():
            alone, _ = policy.get_action(_model_obs(i + 1, i), {"seed": 10 + i})
            for key in alone:
                np.testing.assert_allclose(action[key], alone[key], atol=1e-5)
    finally:
        server.stop(30)
