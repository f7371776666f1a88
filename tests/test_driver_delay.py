"""Inference delay in simulated time and the execution modes (sync, async, ensemble, rtc) of PolicyDriver.

The policy is :class:`helpers.StepIndexPolicy`: the action for step ``t + h`` of a chunk computed at step
``t`` is ``[t + h, h]``, so every executed action shows which query produced it and at which chunk position.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from policyserve import DriverConfig, PolicyDriver
from policyserve.client.keymap import KeyMap
from policyserve.eval.smoothness import smoothness
from policyserve.policies.base import PolicyWrapper

from helpers import StepIndexPolicy

H, S = 16, 4  # action horizon, n_action_steps
DELAYS = [0, 1, 2, 4, 6]


class InpaintingStepIndexPolicy(StepIndexPolicy):
    """StepIndexPolicy that declares the rtc capability and records the rtc options it is sent."""

    capabilities = frozenset({"rtc"})

    def __init__(self, horizon: int, latency_s: float = 0.0) -> None:
        super().__init__(horizon, latency_s)
        self.rtc: list[dict | None] = []

    def _get_action(self, observation, options=None):
        self.rtc.append((options or {}).get("rtc"))
        return super()._get_action(observation, options)


class ClaimsRTC(PolicyWrapper):
    """A wrapper that declares rtc although the policy it wraps refuses the option."""

    capabilities = frozenset({"rtc"})

    def _get_action(self, observation, options=None):
        return self.policy.get_action(observation, options)


def run(driver: PolicyDriver, n_steps: int) -> tuple[np.ndarray, list[list[int]]]:
    """Step counting envs; returns actions (n_steps, n_envs, 2) and each env's action sources."""
    actions, sources = [], []
    for t in range(n_steps):
        obs = {"step": np.full((driver.n_envs, 1), t, np.float64), "task": ["count"] * driver.n_envs}
        actions.append(np.asarray(driver.act(obs)))
        sources.append(list(driver.last_sources))
    return np.stack(actions), [list(s) for s in zip(*sources)]


def driver(policy, execution: str, delay: int | None, n_envs: int = 1, **config) -> PolicyDriver:
    return PolicyDriver(policy, n_envs, DriverConfig(n_action_steps=S, execution=execution,
                                                     inference_delay_steps=delay, hold_zero_dims=(0,),
                                                     key_map=KeyMap(video={}, language="task"), **config),
                        action_dim=2)


def query_steps(execution: str, delay: int, n_steps: int) -> list[int]:
    """The steps the queries are made at: every window in the non-blocking modes (one query in flight at a
    time, so every ``max(S, delay)`` steps), every ``S + delay`` steps in sync mode (it waits)."""
    period = S + delay if execution == "sync" else max(S, delay)
    return list(range(0, n_steps, period))


@pytest.mark.parametrize("delay", DELAYS)
@pytest.mark.parametrize("execution", ["sync", "async", "rtc"])
def test_a_query_at_step_t_changes_the_executed_action_first_at_t_plus_d(execution: str, delay: int) -> None:
    n_steps = 40
    actions, sources = run(driver(InpaintingStepIndexPolicy(H), execution, delay), n_steps)
    queries = query_steps(execution, delay, n_steps)
    for tau in range(n_steps):
        answered = [t for t in queries if t + delay <= tau]
        if not answered:  # the first reply has not arrived: the env holds still (no action yet: zeros)
            np.testing.assert_array_equal(actions[tau, 0], [0, 0])
            assert sources[0][tau] < 0
            continue
        t = answered[-1]
        if execution == "sync":
            h = tau - t - delay
            if h >= S:  # waiting for the next reply: hold still (dim 0 zeroed, dim 1 repeated)
                np.testing.assert_array_equal(actions[tau, 0], [0, S - 1])
            else:
                np.testing.assert_array_equal(actions[tau, 0], [t + h, h])
        else:  # the new chunk takes over at t + d, its first d actions dropped
            np.testing.assert_array_equal(actions[tau, 0], [tau, tau - t])
        if tau == t + delay:
            assert sources[0][tau] == queries.index(t)


@pytest.mark.parametrize("delay", [1, 4])
def test_ensemble_mode_mixes_in_a_chunk_first_at_t_plus_d(delay: int) -> None:
    coef = 0.5
    n_steps = 30
    actions, _ = run(driver(StepIndexPolicy(H), "ensemble", delay, ensemble_coef=coef), n_steps)
    queries = query_steps("ensemble", delay, n_steps)
    for tau in range(delay, n_steps):
        live = [t for t in queries if t + delay <= tau < t + H]
        weights = np.exp(-coef * np.arange(len(live)))
        expected = (weights * (tau - np.array(live))).sum() / weights.sum()
        np.testing.assert_allclose(actions[tau, 0], [tau, expected], rtol=1e-6)


@pytest.mark.parametrize(("guidance", "schedule"), [(None, None), ("vjp", "exp")])
def test_rtc_sends_each_env_its_committed_actions_the_delay_and_the_horizon(guidance, schedule) -> None:
    delay = 3
    policy = InpaintingStepIndexPolicy(H)
    chosen = {} if guidance is None else {"rtc_guidance": guidance, "rtc_schedule": schedule}
    run(driver(policy, "rtc", delay, n_envs=2, **chosen), 13)
    assert policy.rtc[0] is None  # nothing committed before the first chunk
    for k, option in enumerate(policy.rtc[1:], start=1):
        previous = (k - 1) * S  # the chunk being executed was computed at the previous query's step
        expected = np.stack([previous + np.arange(S, H), np.arange(S, H)], axis=-1)  # its actions from step k*S on
        assert option["prefix"]["a"].shape == (2, H - S, 2)
        np.testing.assert_array_equal(option["prefix"]["a"], [expected, expected])
        assert option["inference_delay"] == [delay, delay] and option["prefix_length"] == [H - S, H - S]
        assert option["execution_horizon"] == S
        assert (option["guidance"], option["schedule"]) == (guidance or "identity", schedule or "linear")


@pytest.mark.parametrize(("field", "value"), [("rtc_guidance", "newton"), ("rtc_schedule", "cosine")])
def test_driver_config_refuses_an_unknown_rtc_guidance_or_schedule(field: str, value: str) -> None:
    from policyserve.errors import ConfigError

    with pytest.raises(ConfigError, match=f"{field} must be one of .* got '{value}'"):
        DriverConfig(execution="rtc", **{field: value})


@pytest.mark.parametrize("ensemble_coef", [None, 0.1])
def test_zero_delay_sync_reproduces_the_wall_clock_driver_bit_for_bit(ensemble_coef) -> None:
    def log(delay: int | None) -> np.ndarray:
        d = driver(StepIndexPolicy(H), "sync", delay, n_envs=2, ensemble_coef=ensemble_coef)
        out = []
        for t in range(30):
            out.append(np.asarray(d.act({"step": np.array([[t], [2 * t]], np.float64), "task": ["count"] * 2})))
            if t in (7, 18):
                d.reset([t % 2])
        return np.stack(out)

    np.testing.assert_array_equal(log(0), log(None))


def test_rtc_falls_back_to_async_once_when_the_server_lacks_the_capability(serve) -> None:
    client = serve(StepIndexPolicy(H)).client
    assert client.capabilities == frozenset()
    with pytest.warns(RuntimeWarning, match="falls back to naive 'async'") as caught:
        fallen, _ = run(d := driver(client, "rtc", 2), 20)
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1 and d.execution == "async"
    naive, _ = run(driver(StepIndexPolicy(H), "async", 2), 20)
    np.testing.assert_array_equal(fallen, naive)


def test_rtc_falls_back_to_async_once_when_the_policy_refuses_the_option() -> None:
    with pytest.warns(RuntimeWarning, match="refused the rtc option") as caught:
        fallen, _ = run(d := driver(ClaimsRTC(StepIndexPolicy(H), strict=False), "rtc", 2), 20)
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1 and d.execution == "async"
    naive, _ = run(driver(StepIndexPolicy(H), "async", 2), 20)
    np.testing.assert_array_equal(fallen, naive)


def test_rtc_is_served_end_to_end_and_asks_no_fallback(serve) -> None:
    policy = InpaintingStepIndexPolicy(H)
    client = serve(policy).client
    assert client.capabilities == frozenset({"rtc"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(d := driver(client, "rtc", 2), 12)
    assert d.execution == "rtc" and policy.rtc[1]["inference_delay"] == [2]


def test_wall_clock_rtc_estimates_the_delay_from_round_trip_and_control_period() -> None:
    policy = InpaintingStepIndexPolicy(H, latency_s=0.1)
    d = driver(policy, "rtc", None, control_period_s=0.02, async_threshold=S)
    run(d, 3 * S)
    d.close()
    delays = [option["inference_delay"][0] for option in policy.rtc[1:] if option is not None]
    assert delays and all(5 <= delay <= H - S for delay in delays[1:] or delays), delays  # 0.1 s / 0.02 s


def test_smoothness_separates_chunk_boundaries_from_chunk_interiors() -> None:
    delay = 2
    actions, sources = run(driver(StepIndexPolicy(H), "async", delay), 24)
    jerk = smoothness(actions[:, 0], sources[0])
    assert jerk.inner == 0.0  # inside a chunk the actions are linear in the step
    assert jerk.boundary > 0  # at a switch the chunk position jumps back by S - delay
    assert np.isnan(jerk.ratio) or jerk.ratio > 1


def test_smoothness_leaves_out_the_start_from_rest_but_counts_holds_between_chunks() -> None:
    """At rest for 3 steps while the first query is answered (not a chunk boundary, the same in every mode), then
    chunk 0, a 2-step hold (sync waiting: counted), chunk 1."""
    actions = np.array([0, 0, 0, 5, 6, 7, 8, 9, 9, 9, 10], dtype=float)[:, None]
    sources = [-1, -1, -1, 0, 0, 0, 0, 0, -2, -2, 1]
    jerk = smoothness(actions, sources)
    # Second differences from step 3 on: 0, 0, 0 inside chunk 0; -1, 0, 1 around the hold.
    assert jerk.inner == 0.0 and jerk.boundary == pytest.approx(2 / 3)
    never = smoothness(np.zeros((5, 1)), [-1] * 5)
    assert np.isnan(never.boundary) and np.isnan(never.inner)


def test_rollout_reports_smoothness_and_zero_delay_sync_reproduces_it_bit_for_bit() -> None:
    """A real Franka rollout with the scripted expert: d=0 sync equals the wall-clock driver exactly, and every
    episode reports J_B and J_I; with a delay, sync holds still (dims 0-5 zero) and the episode differs."""
    from policyserve.eval.envs import EnvConfig, make_envs
    from policyserve.sim.envs import FrankaEnvConfig
    from policyserve.eval.rollout import FRANKA_DELTA_DIMS, RolloutConfig, run_rollout
    from policyserve.sim.scripted import ScriptedPolicy

    envs = make_envs(EnvConfig(task="lift", sim=FrankaEnvConfig(camera_size=(32, 32))), 1, max_episode_steps=40)
    try:
        def rollout(delay: int | None) -> dict:
            config = RolloutConfig(env=EnvConfig(task="lift", sim=FrankaEnvConfig(camera_size=(32, 32))),
                                   n_episodes=2, n_envs=1, max_episode_steps=40, seed=3, progress=False,
                                   driver=DriverConfig(n_action_steps=8, inference_delay_steps=delay,
                                                       hold_zero_dims=FRANKA_DELTA_DIMS))
            return run_rollout(ScriptedPolicy("lift", n_action_steps=8), config, envs=envs).to_dict()

        wall, zero, delayed = rollout(None), rollout(0), rollout(4)
    finally:
        envs.close()
    strip = ("timing", "config")
    assert {k: v for k, v in zero.items() if k not in strip} == {k: v for k, v in wall.items() if k not in strip}
    for report in (wall, delayed):
        assert report["jerk_boundary"] is not None and report["jerk_inner"] is not None
        assert all(e["jerk_boundary"] is not None for e in report["episodes"])
    assert [e["return"] for e in delayed["episodes"]] != [e["return"] for e in wall["episodes"]]


def test_rollout_flags_choose_the_rtc_guidance_and_schedule() -> None:
    """``--rtc-guidance``/``--rtc-schedule`` reach the DriverConfig; without them its defaults hold."""
    import argparse

    from policyserve.cli.common import EvalFlags
    from policyserve.eval.rollout import RolloutConfig

    defaults = RolloutConfig()
    parser = argparse.ArgumentParser()
    flags = EvalFlags(parser, defaults.env, defaults.driver)
    chosen = flags.driver_config(parser.parse_args(["--execution", "rtc", "--rtc-guidance", "vjp",
                                                    "--rtc-schedule", "exp"]), 0)
    assert (chosen.execution, chosen.rtc_guidance, chosen.rtc_schedule) == ("rtc", "vjp", "exp")
    default = flags.driver_config(parser.parse_args(["--execution", "rtc"]), 0)
    assert (default.rtc_guidance, default.rtc_schedule) == (DriverConfig.rtc_guidance, DriverConfig.rtc_schedule)
    with pytest.raises(SystemExit):
        parser.parse_args(["--rtc-guidance", "newton"])
