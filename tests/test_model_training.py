"""Training on synthetic episodes, checkpoints, resume, ModelPolicy inference and load_policy errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from policyserve.errors import ConfigError, ValidationError  # noqa: E402
from policyserve.model import checkpoint_kind, load_policy  # noqa: E402
from policyserve.model.checkpoint import resolve_device  # noqa: E402
from policyserve.model.config import TrainConfig  # noqa: E402
from policyserve.model.data import TrainingData, augment_images, build_tokenizer, fit_normalizer  # noqa: E402
from policyserve.model.policy import ModelPolicy  # noqa: E402
from policyserve.model.synthetic import TASKS, make_episodes  # noqa: E402
from policyserve.model.train import Trainer, latest_checkpoint, train_policy  # noqa: E402
from policyserve.registry import get_embodiment_spec  # noqa: E402

pytestmark = pytest.mark.model
torch.set_num_threads(2)
TINY = {"image_size": 24, "conv_channels": [8, 16], "d_model": 32, "n_heads": 2, "trunk_layers": 1, "head_layers": 1}
LANG = "annotation.human.action.task_description"
SPEC = get_embodiment_spec("franka_panda")


def franka_episodes(n: int = 6, seed: int = 0) -> list:
    return make_episodes(SPEC.modality_configs, SPEC.dims.state, SPEC.dims.action, n_episodes=n, length=16,
                         image_hw=(30, 36), seed=seed)


def observation(batch: int = 2, hw: tuple[int, int] = (30, 36), seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "video": {k: rng.integers(0, 255, (batch, 1, *hw, 3), dtype=np.uint8) for k in ("ego_view", "wrist_view")},
        "state": {k: rng.uniform(0, 10, (batch, 1, d)).astype(np.float32) for k, d in SPEC.dims.state.items()},
        "language": {LANG: [[TASKS[i % 2]] for i in range(batch)]},
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A franka_panda checkpoint trained for 30 steps on synthetic episodes."""
    out = tmp_path_factory.mktemp("model")
    eps = franka_episodes()
    train_policy(eps[:5], SPEC.modality_configs, out, TrainConfig(max_steps=30, batch_size=16, save_steps=15,
                 progress=False), eval_episodes=eps[5:], architecture=TINY, embodiment_tag="franka_panda")
    return out


def test_training_reduces_loss(tmp_path: Path) -> None:
    eps = franka_episodes(4)
    result = train_policy(eps, SPEC.modality_configs, tmp_path, TrainConfig(max_steps=60, batch_size=16,
                          save_steps=60, progress=False, learning_rate=1e-3, warmup_steps=5), architecture=TINY)
    losses = [loss for _, loss in result.train_losses]
    assert len(losses) == 60
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5])


def test_checkpoint_layout_and_loss_plot(trained: Path) -> None:
    for name in ("config.json", "model.safetensors", "normalization.json", "loss_curve.png", "trainer_state.json"):
        assert (trained / name).is_file(), name
    assert latest_checkpoint(trained) == trained / "checkpoint-30"
    assert (trained / "checkpoint-15" / "training_state.pt").is_file()
    config = json.loads((trained / "config.json").read_text())
    assert config["format"] == "policyserve-flow-policy" and config["embodiment_tags"] == ["franka_panda"]
    assert config["modality_configs"]["franka_panda"]["action"]["modality_keys"] == ["arm", "gripper"]
    state = json.loads((trained / "trainer_state.json").read_text())
    assert state["step"] == 30 and [s for s, _ in state["eval_losses"]] == [15, 30]
    assert checkpoint_kind(trained) == "policyserve"


def test_resume_continues_from_last_checkpoint(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    shutil.copytree(trained / "checkpoint-15", out / "checkpoint-15")
    eps = franka_episodes()
    config = TrainConfig(max_steps=30, batch_size=16, save_steps=15, progress=False)
    result = train_policy(eps[:5], SPEC.modality_configs, out, config, eval_episodes=eps[5:], architecture=TINY,
                          embodiment_tag="franka_panda")
    assert result.resumed_from == out / "checkpoint-15"
    assert f"Resuming from checkpoint-15 (step 15) in {out}" in capsys.readouterr().err
    assert [s for s, _ in result.train_losses] == list(range(1, 31))
    # the same seed and restored RNG/optimizer states reproduce the uninterrupted run
    reference = json.loads((trained / "trainer_state.json").read_text())["train_losses"]
    np.testing.assert_allclose([l for _, l in result.train_losses], [l for _, l in reference], rtol=1e-4)
    other = TrainConfig(max_steps=30, batch_size=16, save_steps=15, progress=False)
    with pytest.raises(ConfigError, match="different model config"):
        Trainer(eps[:5], SPEC.modality_configs, out, other, architecture={**TINY, "d_model": 64, "n_heads": 2})


def test_save_load_same_actions_for_same_seed(trained: Path) -> None:
    a = load_policy(trained, embodiment_tag="franka_panda")
    b = ModelPolicy.from_checkpoint(trained)
    obs = observation()
    act_a, _ = a.get_action(obs, {"seed": 7})
    act_b, _ = b.get_action(obs, {"seed": 7})
    for key in ("arm", "gripper"):
        np.testing.assert_array_equal(act_a[key], act_b[key])
    other, _ = a.get_action(obs, {"seed": 8})
    assert not np.allclose(other["arm"], act_a["arm"])


def test_policy_level_seed_is_reproducible_after_reset(trained: Path) -> None:
    policy = load_policy(trained, seed=3)
    first = policy.get_action(observation())[0]["arm"]
    second = policy.get_action(observation())[0]["arm"]
    policy.reset()
    np.testing.assert_array_equal(first, policy.get_action(observation())[0]["arm"])
    assert not np.array_equal(first, second)


def test_actions_shaped_float32_in_physical_range(trained: Path) -> None:
    policy = load_policy(trained)
    action, info = policy.get_action(observation(batch=3), {"seed": 0})
    assert info == {}
    stats = policy.bundle.normalizer.stats["action"]
    for key, dim in SPEC.dims.action.items():
        assert action[key].shape == (3, 16, dim) and action[key].dtype == np.float32
        assert (action[key] >= stats[key].min.astype(np.float32) - 1e-5).all()
        assert (action[key] <= stats[key].max.astype(np.float32) + 1e-5).all()
    assert stats["gripper"].max.max() > 1.0  # physical units, not the normalized [-1, 1]


def test_batched_request_equals_per_sample_requests(trained: Path) -> None:
    policy = load_policy(trained)
    obs = observation(batch=4)
    batched, _ = policy.get_action(obs, {"seed": 5})
    for i in range(4):
        single = {m: {k: v[i : i + 1] for k, v in group.items()} for m, group in obs.items()}
        one, _ = policy.get_action(single, {"seed": 5})
        for key in batched:
            np.testing.assert_allclose(one[key][0], batched[key][i], rtol=1e-4, atol=1e-4)


def test_any_image_size_is_resized_and_dims_validated(trained: Path) -> None:
    policy = load_policy(trained)
    dims = policy.get_modality_dims()
    assert dims.state == SPEC.dims.state and dims.action == SPEC.dims.action and dims.video == {}
    action, _ = policy.get_action(observation(batch=1, hw=(84, 84)))
    assert action["arm"].shape == (1, 16, 6)
    bad = observation()
    bad["state"]["eef_pos"] = np.zeros((2, 1, 4), np.float32)
    with pytest.raises(ValidationError, match="dimension D=3"):
        policy.get_action(bad)
    with pytest.raises(ValidationError, match="seed"):
        policy.get_action(observation(), {"seed": "seven"})


def test_load_policy_error_cases(trained: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_policy(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        load_policy(tmp_path / "file")
    with pytest.raises(ConfigError, match=r"neither a policyserve checkpoint.*did you mean .*checkpoint-30"):
        load_policy(_only_subdirs(trained, tmp_path))
    with pytest.raises(ConfigError, match="not trained for embodiment 'gr1'; it has: franka_panda"):
        load_policy(trained, embodiment_tag="GR1")
    for device in ("cuda:7", "tpu", "not a device"):
        if device.startswith("cuda") and torch.cuda.device_count() > 7:
            continue
        with pytest.raises(ConfigError, match="device|CUDA"):
            load_policy(trained, device=device)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")


def _only_subdirs(trained: Path, tmp_path: Path) -> Path:
    """An output dir holding only checkpoint-30/ (no final model at its root)."""
    out = tmp_path / "only_subdirs"
    shutil.copytree(trained / "checkpoint-30", out / "checkpoint-30")
    return out


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda d: (d / "model.safetensors").unlink(), "missing model.safetensors"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 20), "weights .* are corrupt"),
        (lambda d: (d / "normalization.json").unlink(), "missing normalization.json"),
        (lambda d: (d / "normalization.json").write_text("{not json"), "corrupt"),
        (lambda d: (d / "config.json").write_text("{truncated"), "corrupt"),
        (lambda d: _edit_config(d, lambda c: c.pop("model")), "corrupt or incomplete"),
        (lambda d: _edit_config(d, lambda c: c["model"].update(d_model=64)), "do not match its config.json"),
        (lambda d: _edit_config(d, lambda c: c.update(format_version=99)), "upgrade policyserve"),
    ],
)
def test_corrupt_checkpoints_raise_config_error(trained: Path, tmp_path: Path, damage, match: str) -> None:
    ckpt = tmp_path / "ckpt"
    for name in ("config.json", "model.safetensors", "normalization.json"):
        ckpt.mkdir(exist_ok=True)
        shutil.copy(trained / name, ckpt / name)
    damage(ckpt)
    with pytest.raises(ConfigError, match=match):
        load_policy(ckpt)


def _edit_config(directory: Path, edit) -> None:
    config = json.loads((directory / "config.json").read_text())
    edit(config)
    (directory / "config.json").write_text(json.dumps(config))


def test_training_data_indices_pad_at_episode_edges() -> None:
    eps = franka_episodes(2)
    configs = SPEC.modality_configs
    data = TrainingData(eps, configs, fit_normalizer(eps, configs), build_tokenizer(eps, configs), 24)
    assert len(data) == 32 and data.frames["ego_view"].shape == (32, 3, 24, 24)
    batch = data.batch(np.array([15, 16]))
    assert batch.actions.shape == (2, 16, 7) and batch.video["ego_view"].shape == (2, 1, 3, 24, 24)
    # sample 15 is the last step of episode 0: its chunk repeats that step instead of running into episode 1
    assert torch.equal(batch.actions[0, 0], batch.actions[0, -1])
    assert torch.equal(batch.actions[1, 0], data.actions[16])
    images = torch.rand(4, 2, 3, 24, 24)
    augmented = augment_images(images)
    assert augmented.shape == images.shape and not torch.equal(augmented, images)
    assert augmented.min() >= 0 and augmented.max() <= 1
    with pytest.raises(ConfigError, match="no episodes"):
        TrainingData([], configs, data_normalizer := fit_normalizer(eps, configs), build_tokenizer(eps, configs), 24)
    with pytest.raises(ConfigError, match="no state key 'eef_pos'"):
        broken = franka_episodes(1)
        del broken[0].states["eef_pos"]
        TrainingData(broken, configs, data_normalizer, build_tokenizer(eps, configs), 24)
