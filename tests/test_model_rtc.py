"""Real-time chunking in the flow-matching policy: soft mask, guidance, per-row serving, refusal and errors."""

from __future__ import annotations

import dataclasses
import tempfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from policyserve.errors import ServerError, ValidationError  # noqa: E402
from policyserve.model.config import TrainConfig  # noqa: E402
from policyserve.model.policy import ModelPolicy  # noqa: E402
from policyserve.model.rtc import guidance_weight, soft_mask  # noqa: E402
from policyserve.model.synthetic import TASKS, make_episodes  # noqa: E402
from policyserve.model.train import Trainer  # noqa: E402
from policyserve.policies.base import ActionRequest, merge_key  # noqa: E402
from policyserve.policies.constant import ConstantPolicy  # noqa: E402
from policyserve.registry import get_embodiment_spec  # noqa: E402
from policyserve.sim.scripted import ScriptedPolicy  # noqa: E402

pytestmark = pytest.mark.model
torch.set_num_threads(1)
SPEC = get_embodiment_spec("franka_panda")
LANG = "annotation.human.action.task_description"
TINY = {"image_size": 24, "conv_channels": [8, 16], "d_model": 32, "n_heads": 2, "trunk_layers": 1, "head_layers": 1}
H, S, D = 16, 8, 3  # chunk length, execution horizon, inference delay
FROZEN_TOLERANCE = 0.1
"""Largest |RTC action - committed action| on the frozen steps, in the policy's normalized action units
(min-max normalization: the training data spans [-1, 1], so 0.1 is 5 % of an action's range)."""


def trained(architecture: dict) -> ModelPolicy:
    """A tiny flow-matching policy trained for 30 steps on synthetic franka_panda episodes."""
    episodes = make_episodes(SPEC.modality_configs, SPEC.dims.state, SPEC.dims.action, n_episodes=4, length=20,
                             image_hw=(24, 24))
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(episodes, SPEC.modality_configs, out,
                          TrainConfig(max_steps=40, batch_size=8, progress=False, resume=False, save_steps=1000),
                          architecture=architecture, embodiment_tag="franka_panda")
        losses = [trainer.train_step() for _ in range(30)]
    assert all(np.isfinite(losses))
    return ModelPolicy(trainer.model, trainer.bundle)


@pytest.fixture(scope="module")
def policy() -> ModelPolicy:
    return trained(TINY)


def observation(batch: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "video": {k: rng.integers(0, 255, (batch, 1, 24, 24, 3), dtype=np.uint8)
                  for k in SPEC.modality_configs["video"].modality_keys},
        "state": {k: rng.normal(size=(batch, 1, d)).astype(np.float32) for k, d in SPEC.dims.state.items()},
        "language": {LANG: [[TASKS[seed % 2]]] * batch},
    }


def committed(policy: ModelPolicy, obs: dict, seed: int) -> dict[str, np.ndarray]:
    """The remainder (after S executed steps) of a previous chunk: the prefix a client has committed to."""
    previous, _ = policy.get_action(obs, {"seed": seed})
    return {k: v[:, S:] for k, v in previous.items()}


def rtc(prefix: dict, delay: int = D, horizon: int = S, **extra: object) -> dict:
    return {"prefix": prefix, "inference_delay": delay, "execution_horizon": horizon, **extra}


def normalized(policy: ModelPolicy, action: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([policy.bundle.normalizer.normalize("action", k, action[k])
                           for k in policy.bundle.model_config.action_dims], axis=-1)


def test_soft_mask_freezes_the_delay_and_decays_to_zero_at_h_minus_s() -> None:
    exp = soft_mask(H, D, S, H - S, "exp")
    linear = soft_mask(H, D, S, H - S, "linear")
    for weights in (exp, linear):
        assert weights.shape == (H,)
        np.testing.assert_array_equal(weights[:D], 1.0)
        np.testing.assert_array_equal(weights[H - S:], 0.0)
        assert np.all((weights[D:H - S] > 0) & (weights[D:H - S] < 1)) and np.all(np.diff(weights[D:]) <= 0)
    c = (H - S - np.arange(D, H - S)) / (H - S - D + 1)  # the paper's eq. 5
    np.testing.assert_allclose(linear[D:H - S], c, rtol=1e-6)
    np.testing.assert_allclose(exp[D:H - S], c * np.expm1(c) / (np.e - 1), rtol=1e-6)
    # No target beyond a shorter prefix; a delay past H - s keeps the frozen steps.
    np.testing.assert_array_equal(soft_mask(H, D, S, 5, "exp")[5:], 0.0)
    np.testing.assert_array_equal(soft_mask(H, 6, 12, 8, "exp"), [1.0] * 6 + [0.0] * 10)


def test_guidance_weight_is_clipped_at_beta() -> None:
    beta = torch.tensor([5.0, 0.0, 100.0])
    assert guidance_weight(0.0, beta).tolist() == [5.0, 0.0, 100.0]
    at_half = guidance_weight(0.5, beta)  # (t^2 + (1-t)^2) / (t (1-t)) = 2 at t = 0.5
    assert at_half.tolist() == [2.0, 0.0, 2.0]


@pytest.mark.parametrize("guidance", ["vjp", "identity"])
def test_beta_zero_equals_a_plain_call(policy: ModelPolicy, guidance: str) -> None:
    obs = observation(3)
    prefix = committed(policy, obs, seed=2)
    plain, _ = policy.get_action(obs, {"seed": 1})
    guided, _ = policy.get_action(obs, {"seed": 1, "rtc": rtc(prefix, max_guidance_weight=0.0, guidance=guidance)})
    for key in plain:
        np.testing.assert_allclose(guided[key], plain[key], rtol=0, atol=1e-5)


@pytest.mark.parametrize("schedule", ["exp", "linear"])
def test_rtc_output_follows_the_committed_prefix_on_the_frozen_steps(policy: ModelPolicy, schedule: str) -> None:
    obs = observation(3)
    prefix = committed(policy, obs, seed=2)
    plain, _ = policy.get_action(obs, {"seed": 1})
    guided, _ = policy.get_action(obs, {"seed": 1, "rtc": rtc(prefix, schedule=schedule)})
    target = normalized(policy, prefix)[:, :D]
    guided_error = np.abs(normalized(policy, guided)[:, :D] - target).max()
    plain_error = np.abs(normalized(policy, plain)[:, :D] - target).max()
    assert guided_error <= FROZEN_TOLERANCE, (guided_error, plain_error)
    assert plain_error > 5 * FROZEN_TOLERANCE  # the seeds were chosen so that the plain chunk disagrees


@pytest.mark.parametrize("schedule", ["exp", "linear"])
def test_identity_guidance_lands_on_the_frozen_steps_and_blends_into_the_soft_ones(policy: ModelPolicy,
                                                                                   schedule: str) -> None:
    """With the Jacobian taken as the identity the frozen steps equal the prefix (to float precision: the last
    Euler step carries the predicted chunk onto the target), and the soft-mask steps lie nearer the prefix
    than the plain chunk does, the nearer the larger their weight."""
    obs = observation(3)
    prefix = committed(policy, obs, seed=2)
    plain, _ = policy.get_action(obs, {"seed": 1})
    guided, _ = policy.get_action(obs, {"seed": 1, "rtc": rtc(prefix, schedule=schedule, guidance="identity")})
    target, out, free = normalized(policy, prefix), normalized(policy, guided), normalized(policy, plain)
    np.testing.assert_allclose(out[:, :D], target[:, :D], rtol=0, atol=1e-4)
    weights = soft_mask(H, D, S, H - S, schedule)
    soft = slice(D, H - S)
    guided_error = np.abs(out[:, soft] - target[:, soft]).mean(axis=(0, 2))
    plain_error = np.abs(free[:, soft] - target[:, soft]).mean(axis=(0, 2))
    assert np.all(guided_error < plain_error), (guided_error, plain_error)
    ratio = guided_error / plain_error
    assert np.all(np.diff(ratio) > 0), (ratio, weights[soft])  # weights fall along the soft steps


def assert_merged_equals_separate(policy: ModelPolicy, obs: list[dict], options: list[dict]) -> list[dict]:
    """Serve the requests one by one and as one merged call; the chunks agree. Returns the separate chunks."""
    separate = [policy.get_action(o, opts)[0] for o, opts in zip(obs, options)]
    merged = policy.serve_batch([ActionRequest(o, opts, f"c{i}") for i, (o, opts) in enumerate(zip(obs, options))])
    for alone, outcome in zip(separate, merged):
        assert not isinstance(outcome, Exception), outcome
        for key in alone:
            np.testing.assert_allclose(outcome[0][key], alone[key], rtol=0, atol=1e-5)
    return separate


def test_merged_rtc_requests_equal_separate_ones(policy: ModelPolicy) -> None:
    """Different prefixes, delays and horizons, and a request without RTC, in one merged call."""
    obs = [observation(2, seed=0), observation(1, seed=1), observation(1, seed=3)]
    options = [
        {"seed": 1, "rtc": rtc(committed(policy, obs[0], seed=5))},
        {"seed": 2},
        {"seed": 3, "rtc": rtc({k: v[:, :6] for k, v in committed(policy, obs[2], seed=6).items()}, delay=4,
                               horizon=10, schedule="linear")},
        {"seed": 4, "rtc": rtc(committed(policy, obs[1], seed=7), delay=2, guidance="identity")},
    ]
    obs.append(observation(1, seed=1))
    assert len({merge_key(o, policy.row_options) for o in options}) == 1  # the scheduler merges them
    assert_merged_equals_separate(policy, obs, options)


def test_per_row_delays_and_prefix_lengths_equal_one_row_requests(policy: ModelPolicy) -> None:
    """A driver's batch: rows with different committed lengths and delays, and a row without a prefix."""
    obs = observation(3)
    prefix = committed(policy, obs, seed=2)
    batched, _ = policy.get_action(obs, {"seed": 1, "rtc": rtc(prefix, delay=[3, 1, 0], prefix_length=[8, 5, 0])})
    for row, (delay, length) in enumerate([(3, 8), (1, 5)]):
        alone, _ = policy.get_action({k: _rows(v, row) for k, v in obs.items()},
                                     {"seed": 1, "rtc": rtc({k: v[row:row + 1, :length] for k, v in prefix.items()},
                                                            delay=delay)})
        for key in alone:
            np.testing.assert_allclose(batched[key][row:row + 1], alone[key], rtol=0, atol=1e-5)
    plain, _ = policy.get_action({k: _rows(v, 2) for k, v in obs.items()}, {"seed": 1})
    for key in plain:
        np.testing.assert_allclose(batched[key][2:], plain[key], rtol=0, atol=1e-5)


def _rows(group: dict, row: int) -> dict:
    return {k: v[row:row + 1] for k, v in group.items()}


def test_a_bad_rtc_request_fails_alone_in_a_merged_batch(policy: ModelPolicy) -> None:
    obs = observation(1)
    good = {"seed": 1, "rtc": rtc(committed(policy, obs, seed=2))}
    bad = {"seed": 1, "rtc": rtc(committed(policy, obs, seed=2), delay=H - S + 1)}
    outcomes = policy.serve_batch([ActionRequest(obs, good, "a"), ActionRequest(obs, bad, "b")])
    assert not isinstance(outcomes[0], Exception)
    assert isinstance(outcomes[1], ValidationError) and "inference_delay" in str(outcomes[1])


BAD_OPTIONS = [
    (lambda p: {**rtc(p), "delay": 1}, "unknown or missing keys"),
    (lambda p: {"prefix": p, "inference_delay": 1}, "unknown or missing keys"),
    (lambda p: rtc({"arm": p["arm"]}), "prefix"),
    (lambda p: rtc({**p, "base": p["arm"]}), "prefix"),
    (lambda p: rtc({**p, "arm": p["arm"][..., :5]}), "options.rtc.prefix['arm']: expected shape (1, P, 6)"),
    (lambda p: rtc({**p, "arm": np.concatenate([p["arm"]] * 2)}), "shape (1, P, 6)"),
    (lambda p: rtc({**p, "gripper": p["gripper"][:, :4]}),
     "options.rtc.prefix['gripper']: expected shape (1, 8, 1)"),
    (lambda p: rtc({k: np.concatenate([v] * 3, axis=1) for k, v in p.items()}), "1 <= P <= 16"),
    (lambda p: rtc({**p, "arm": np.full_like(p["arm"], np.nan)}), "finite values"),
    (lambda p: rtc(p, delay=9),
     "options.rtc['inference_delay']: expected an int from 0 to 8 (at most the prefix length P=8"),
    (lambda p: rtc(p, delay=H + 1), "inference_delay"),
    (lambda p: rtc(p, delay=[1, 2]), "options.rtc['inference_delay']: expected one int per batch row (1), got 2 values"),
    (lambda p: rtc(p, delay=4, prefix_length=[3]), "expected at most row 0's prefix_length 3"),
    (lambda p: rtc(p, prefix_length=[9]), "options.rtc['prefix_length']: expected an int from 0 to 8"),
    (lambda p: rtc(p, delay=-1), "inference_delay"),
    (lambda p: rtc(p, delay=2.0), "inference_delay"),
    (lambda p: rtc(p, horizon=0), "options.rtc['execution_horizon']: expected an int from 1 to 16"),
    (lambda p: rtc(p, horizon=H + 1), "execution_horizon"),
    (lambda p: rtc(p, max_guidance_weight=-1.0), "max_guidance_weight"),
    (lambda p: rtc(p, schedule="cosine"), "options.rtc['schedule']: expected one of ['exp', 'linear']"),
    (lambda p: rtc(p, guidance="newton"), "options.rtc['guidance']: expected one of ['vjp', 'identity']"),
    (lambda p: [rtc(p)] * 2, "options['rtc']: expected one value per batch row (1), got a list of 2"),
    (lambda p: "prefix", "options['rtc']: expected a map with keys prefix"),
]


@pytest.mark.parametrize(("make", "message"), BAD_OPTIONS)
def test_invalid_rtc_options_give_clear_errors(policy: ModelPolicy, make, message: str) -> None:
    obs = observation(1)
    with pytest.raises(ValidationError) as raised:
        policy.get_action(obs, {"rtc": make(committed(policy, obs, seed=2))})
    assert message in str(raised.value), str(raised.value)


def test_policies_that_cannot_inpaint_refuse_rtc(policy: ModelPolicy) -> None:
    obs = observation(1)
    option = {"rtc": rtc(committed(policy, obs, seed=2))}
    constant = ConstantPolicy(SPEC.modality_configs, SPEC.dims)
    scripted = ScriptedPolicy("lift")
    scripted_obs = {"state": {k: np.zeros((1, 1, d), np.float32)
                              for k, d in scripted.get_modality_dims().state.items()},
                    "language": {LANG: [["lift"]]}}
    assert "rtc" in policy.capabilities and not constant.capabilities and not scripted.capabilities
    for refusing, request_obs in ((constant, obs), (scripted, scripted_obs)):
        with pytest.raises(ValidationError, match="this policy cannot inpaint a committed action prefix"):
            refusing.get_action(request_obs, option)
        outcome = refusing.serve_batch([ActionRequest(request_obs, option, "a")])[0]
        assert isinstance(outcome, ValidationError) and "rtc" in str(outcome)


def test_rtc_served_over_the_gr00t_wire(policy: ModelPolicy, serve) -> None:
    """The option travels as nested maps of arrays; a server whose policy cannot inpaint answers the error."""
    obs = observation(2)
    options = {"seed": 1, "rtc": rtc(committed(policy, obs, seed=2))}
    local, _ = policy.get_action(obs, options)
    reply = serve(policy).client.call_endpoint("get_action", {"observation": obs, "options": options})
    for key in local:
        np.testing.assert_allclose(reply[0][key], local[key], rtol=0, atol=1e-5)
    constant = serve(ConstantPolicy(SPEC.modality_configs, SPEC.dims)).client
    with pytest.raises(ServerError, match="cannot inpaint"):
        constant.call_endpoint("get_action", {"observation": obs, "options": options})


@pytest.fixture(scope="module")
def conditioned_policy() -> ModelPolicy:
    """The tiny policy trained with training-time RTC (``rtc_max_delay`` 4)."""
    return trained({**TINY, "rtc_max_delay": 4})


def test_per_step_flow_times_equal_one_time_per_chunk(policy: ModelPolicy) -> None:
    net = policy.model
    memory = net.encode(*[v for v in _encoded(policy, observation(2))])
    x = torch.randn(2, H, policy.bundle.model_config.action_dim)
    t = torch.tensor([0.25, 0.75])
    with torch.no_grad():
        torch.testing.assert_close(net.velocity(memory, x, t), net.velocity(memory, x, t.view(2, 1).expand(2, H)))


def _encoded(policy: ModelPolicy, obs: dict) -> tuple:
    video, state, text, _ = policy._inputs(obs)
    return video, state, text


def test_training_time_rtc_loss_scores_only_the_steps_after_the_prefix(conditioned_policy: ModelPolicy) -> None:
    """The committed prefix is an input, not a target: shifting its targets moves the loss far less than shifting
    the same number of scored steps; with no prefix (delay 0) the loss is the plain flow-matching loss."""
    net = conditioned_policy.model
    video, state, text = _encoded(conditioned_policy, observation(3))
    actions = torch.rand(3, H, conditioned_policy.bundle.model_config.action_dim) * 2 - 1
    four = torch.full((3,), 4)

    def loss(chunk: torch.Tensor, delays: torch.Tensor | None) -> float:
        torch.manual_seed(0)
        with torch.no_grad():
            return float(net.loss(video, state, text, chunk, delays))

    base = loss(actions, four)
    prefix_moved, scored_moved = actions.clone(), actions.clone()
    prefix_moved[:, :4] += 5.0
    scored_moved[:, 4:8] += 5.0
    assert abs(loss(scored_moved, four) - base) > 10 * abs(loss(prefix_moved, four) - base)
    no_prefix = loss(actions, torch.zeros(3, dtype=torch.long))
    saved, net.config = net.config, dataclasses.replace(net.config, rtc_max_delay=0)
    try:
        plain = loss(actions, None)
    finally:
        net.config = saved
    assert no_prefix == pytest.approx(plain, rel=1e-5)


@pytest.mark.parametrize("delay", [2, 4, 6])
def test_training_time_rtc_holds_the_frozen_steps_exactly(conditioned_policy: ModelPolicy, delay: int) -> None:
    """Up to ``rtc_max_delay`` frozen steps are held at the committed prefix exactly; beyond it they are guided."""
    policy = conditioned_policy
    obs = observation(3)
    prefix = committed(policy, obs, seed=2)
    plain, _ = policy.get_action(obs, {"seed": 1})
    guided, _ = policy.get_action(obs, {"seed": 1, "rtc": rtc(prefix, delay=delay)})
    target = normalized(policy, prefix)
    out = normalized(policy, guided)
    held = min(delay, 4)
    np.testing.assert_allclose(out[:, :held], target[:, :held], rtol=0, atol=1e-5)
    assert np.abs(normalized(policy, plain)[:, :held] - target[:, :held]).max() > 5 * FROZEN_TOLERANCE
    # The free steps are the model's own continuation of the prefix, not the plain chunk.
    assert np.abs(out[:, delay:] - normalized(policy, plain)[:, delay:]).max() > 1e-3


def test_training_time_rtc_merged_equals_separate_and_delay_zero_is_plain(conditioned_policy: ModelPolicy) -> None:
    policy = conditioned_policy
    obs = [observation(2, seed=0), observation(1, seed=1)]
    options = [{"seed": 1, "rtc": rtc(committed(policy, obs[0], seed=5), delay=3)},
               {"seed": 2, "rtc": rtc(committed(policy, obs[1], seed=6), delay=0, max_guidance_weight=0.0)}]
    separate = assert_merged_equals_separate(policy, obs, options)
    plain, _ = policy.get_action(obs[1], {"seed": 2})
    for key in plain:  # no frozen step and no guidance: the plain chunk
        np.testing.assert_allclose(separate[1][key], plain[key], rtol=0, atol=1e-6)


def test_a_driver_runs_rtc_against_the_served_model(policy: ModelPolicy, serve) -> None:
    """PolicyDriver in rtc mode (sim-time delay) against the trained policy served on loopback: no fallback, the
    same executed actions as with the policy in process, and the chosen guidance reaches the server."""
    import warnings

    from policyserve import DriverConfig, PolicyDriver

    rng = np.random.default_rng(0)
    frames = [{"table_cam": rng.integers(0, 255, (2, 24, 24, 3), dtype=np.uint8),
               "wrist_cam": rng.integers(0, 255, (2, 24, 24, 3), dtype=np.uint8),
               **{k: rng.normal(size=(2, d)).astype(np.float32) for k, d in SPEC.dims.state.items()},
               "task": [TASKS[0], TASKS[1]]} for _ in range(3 * S)]

    def executed(target, guidance: str) -> np.ndarray:
        driver = PolicyDriver(target, 2, DriverConfig(n_action_steps=S, execution="rtc", inference_delay_steps=D,
                                                      action_options={"seed": 0}, rtc_guidance=guidance),
                             action_dim=sum(SPEC.dims.action.values()))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a fallback to async would warn
            actions = np.stack([np.asarray(driver.act(obs)) for obs in frames])
        assert driver.execution == "rtc"
        return actions

    client = serve(policy).client
    served = executed(client, "identity")
    np.testing.assert_allclose(served, executed(policy, "identity"), rtol=0, atol=1e-5)
    paper = executed(client, "vjp")
    first_rtc_step = S + D  # the second query (step S, the first with a committed prefix) answers at S + D
    np.testing.assert_array_equal(served[:first_rtc_step], paper[:first_rtc_step])
    assert np.abs(served[first_rtc_step:] - paper[first_rtc_step:]).max() > 1e-3
