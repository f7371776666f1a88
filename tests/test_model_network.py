"""Network shapes, normalization, tokenizer and learning-rate schedule of policyserve's model."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from policyserve.errors import ConfigError  # noqa: E402
from policyserve.model.config import ModelConfig  # noqa: E402
from policyserve.model.network import FlowMatchingPolicyNet  # noqa: E402
from policyserve.model.normalization import MEAN_STD, MIN_MAX, KeyStats, Normalizer  # noqa: E402
from policyserve.model.text import TextTokenizer  # noqa: E402
from policyserve.model.train import lr_factor  # noqa: E402
from policyserve.types import ModalityConfig  # noqa: E402

pytestmark = pytest.mark.model
torch.set_num_threads(1)
TINY = {"image_size": 24, "conv_channels": [8, 16], "d_model": 32, "n_heads": 2, "trunk_layers": 1, "head_layers": 1}


def configs_for(cameras: list[str], states: list[str], actions: list[str], t: int, horizon: int = 8) -> dict:
    return {
        "video": ModalityConfig(list(range(-t + 1, 1)), cameras),
        "state": ModalityConfig(list(range(-t + 1, 1)), states),
        "action": ModalityConfig(list(range(horizon)), actions),
        "language": ModalityConfig([0], ["task"]),
    }


CASES = [
    (["cam"], ["pos"], ["arm"], 1),
    (["ego", "wrist"], ["pos", "quat"], ["arm", "gripper"], 1),
    (["ego"], ["pos", "quat", "gripper"], ["arm", "gripper", "base"], 2),
    (["ego", "wrist"], ["joints"], ["arm", "gripper"], 2),
]


@pytest.mark.parametrize(("cameras", "states", "actions", "t"), CASES)
def test_forward_backward_shapes(cameras: list[str], states: list[str], actions: list[str], t: int) -> None:
    state_dims = {k: 2 + i for i, k in enumerate(states)}
    action_dims = {k: 1 + 2 * i for i, k in enumerate(actions)}
    config = ModelConfig.from_modality_configs(configs_for(cameras, states, actions, t), state_dims, action_dims,
                                               text_vocab_size=10, **TINY)
    assert (config.video_horizon, config.state_horizon, config.action_horizon) == (t, t, 8)
    net = FlowMatchingPolicyNet(config)
    b = 3
    video = {k: torch.rand(b, t, 3, 24, 24) for k in cameras}
    state = {k: torch.randn(b, t, d) for k, d in state_dims.items()}
    text = torch.randint(0, 10, (b, 16))
    target = torch.randn(b, 8, config.action_dim)
    loss = net.loss(video, state, text, target)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    grads = [p.grad for p in net.image_encoders.parameters()] + [p.grad for p in net.state_encoders.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    out = net.eval().sample(video, state, text, torch.randn(b, 8, config.action_dim))
    assert out.shape == (b, 8, sum(action_dims.values()))


def test_observation_history_changes_output() -> None:
    """With T = 2 the earlier frame is an input: changing it changes the predicted chunk."""
    config = ModelConfig.from_modality_configs(configs_for(["cam"], ["pos"], ["arm"], 2), {"pos": 3}, {"arm": 2},
                                               **TINY)
    net = FlowMatchingPolicyNet(config).eval()
    video = {"cam": torch.rand(1, 2, 3, 24, 24)}
    state = {"pos": torch.randn(1, 2, 3)}
    text, noise = torch.zeros(1, 16, dtype=torch.long), torch.randn(1, 8, 2)
    before = net.sample(video, state, text, noise)
    state["pos"][:, 0] += 1.0
    assert not torch.allclose(before, net.sample(video, state, text, noise))


def test_model_config_errors_and_json_round_trip() -> None:
    config = ModelConfig(["cam"], {"pos": 3}, {"arm": 7}, **TINY)
    assert ModelConfig.from_json(config.to_json()) == config
    with pytest.raises(ConfigError, match="unknown fields"):
        ModelConfig.from_json({**config.to_json(), "bogus": 1})
    with pytest.raises(ConfigError, match="divisible"):
        ModelConfig(["cam"], {"pos": 3}, {"arm": 7}, d_model=30, n_heads=4)
    with pytest.raises(ConfigError, match="at least one action"):
        ModelConfig(["cam"], {"pos": 3}, {})
    with pytest.raises(ConfigError, match="no dimension known"):
        ModelConfig.from_modality_configs(configs_for(["cam"], ["pos"], ["arm"], 1), {}, {"arm": 1})


def test_normalization_round_trip_min_max_and_mean_std() -> None:
    rng = np.random.default_rng(0)
    data = {"state": {"pos": rng.normal(5.0, 3.0, (100, 3)).astype(np.float32)},
            "action": {"arm": rng.uniform(-0.2, 0.4, (100, 6)).astype(np.float32),
                       "constant": np.full((100, 2), 7.0, np.float32)}}
    norm = Normalizer.fit(data, {"state": ["pos"]})
    assert norm.stats["state"]["pos"].mode == MEAN_STD and norm.stats["action"]["arm"].mode == MIN_MAX
    arm = norm.normalize("action", "arm", data["action"]["arm"])
    assert arm.min() == pytest.approx(-1.0, abs=1e-5) and arm.max() == pytest.approx(1.0, abs=1e-5)
    pos = norm.normalize("state", "pos", data["state"]["pos"])
    assert abs(pos.mean()) < 1e-4 and pos.std() == pytest.approx(1.0, abs=1e-3)
    assert np.all(norm.normalize("action", "constant", data["action"]["constant"]) == 0.0)
    reloaded = Normalizer.from_json(norm.to_json())
    for modality, keys in data.items():
        for key, values in keys.items():
            back = reloaded.unnormalize(modality, key, reloaded.normalize(modality, key, values))
            np.testing.assert_allclose(back, values, rtol=1e-5, atol=1e-5)
    # min-max outputs beyond [-1, 1] are clipped to the training range
    assert norm.unnormalize("action", "arm", np.full((1, 6), 3.0)).max() == pytest.approx(data["action"]["arm"].max())


def test_normalization_errors() -> None:
    norm = Normalizer.fit({"state": {"pos": np.zeros((4, 2))}})
    with pytest.raises(ConfigError, match=r"state\['missing'\]"):
        norm.normalize("state", "missing", np.zeros((1, 2)))
    with pytest.raises(ConfigError, match="unknown normalization mode"):
        KeyStats.from_array(np.zeros((3, 1)), "log")
    with pytest.raises(ConfigError, match="zero samples"):
        KeyStats.from_array(np.zeros((0, 2)))
    with pytest.raises(ConfigError, match="invalid normalization statistics"):
        Normalizer.from_json({"state": {"pos": {"mode": MIN_MAX, "min": [0.0]}}})


def test_tokenizer_vocab_unknown_words_and_padding() -> None:
    tok = TextTokenizer.build(["Lift the cube", "open the drawer"], max_len=4)
    assert tok.vocab[:2] == ["<pad>", "<unk>"] and "cube" in tok.vocab and len(tok) == 7
    ids = tok.encode(["lift the CUBE!", "lift the banana please now", ""])
    assert ids.shape == (3, 4) and ids.dtype == np.int64
    assert ids[0, 3] == 0 and ids[0, 0] == tok.vocab.index("lift")
    assert ids[1, 2] == 1 and ids[1, 3] == 1  # unknown words, truncated to max_len
    assert not ids[2].any()
    assert TextTokenizer(tok.vocab, 4).vocab == tok.vocab


def test_text_changes_the_prediction() -> None:
    config = ModelConfig(["cam"], {"pos": 2}, {"arm": 2}, action_horizon=4, text_vocab_size=5, **TINY)
    net = FlowMatchingPolicyNet(config).eval()
    args = ({"cam": torch.rand(1, 1, 3, 24, 24)}, {"pos": torch.randn(1, 1, 2)})
    noise = torch.randn(1, 4, 2)
    a = net.sample(*args, torch.tensor([[2, 3] + [0] * 14]), noise)
    b = net.sample(*args, torch.tensor([[4, 0] + [0] * 14]), noise)
    assert not torch.allclose(a, b)


def test_lr_schedule_warmup_then_cosine() -> None:
    factors = [lr_factor(s, 10, 100, 0.1) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[-1] == pytest.approx(0.1, abs=1e-3)
