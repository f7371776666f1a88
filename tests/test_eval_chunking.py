"""Receding-horizon chunk execution, mid-chunk resets and exact episode counting with a step-index policy."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from policyserve.client.adapter import KeyMap
from policyserve.client.chunking import ActionChunker, ChunkingConfig, ChunkSyncError
from policyserve.client.driver import DriverConfig
from policyserve.errors import ConfigError
from policyserve.eval.envs import EnvConfig
from policyserve.eval.rollout import RolloutConfig, run_rollout, wilson_interval
from policyserve.client.policy_client import PolicyClient
from policyserve.serving.server import PolicyServer

from helpers import StepIndexPolicy

HORIZON = 5


class CounterEnv(gym.Env):
    """Observes its own step index; episode k (from the seed) lasts 4 + k % 5 steps; logs actions it gets."""

    task_description = "count"

    def __init__(self) -> None:
        self.action_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
        self.t = 0
        self.length = 0
        self.log: list[tuple[int, int, np.ndarray]] = []  # (episode seed, step, action)

    def _obs(self):
        return {"step": np.array([self.t], np.float64), "task": self.task_description}

    def reset(self, *, seed=None, options=None):
        self.seed_, self.t, self.length = seed, 0, 4 + seed % 5
        return self._obs(), {"success": False}

    def step(self, action):
        self.log.append((self.seed_, self.t, np.asarray(action).copy()))
        self.t += 1
        done = self.t >= self.length
        return self._obs(), 1.0, done, False, {"success": done and self.seed_ % 2 == 0}


def _config(**kw):
    driver = DriverConfig(n_action_steps=3, key_map=KeyMap(video={}, language="task"))
    base = dict(env=EnvConfig(task="counter"), driver=driver, n_episodes=7, n_envs=2, max_episode_steps=50, seed=0,
                progress=False)
    return RolloutConfig(**{**base, **kw})


def _episodes_from_logs(envs):
    by_episode: dict[int, list[np.ndarray]] = {}
    for env in envs:
        for seed, _, action in env.log:
            by_episode.setdefault(seed, []).append(action)
    return by_episode


@pytest.mark.parametrize("n_envs", [1, 2, 3])
def test_chunks_execute_receding_horizon_and_restart_fresh_after_reset(n_envs):
    envs = [CounterEnv() for _ in range(n_envs)]
    policy = StepIndexPolicy(HORIZON)
    report = run_rollout(policy, _config(n_envs=n_envs), envs=envs)
    assert [e.episode for e in report.episodes] == list(range(7))  # exactly n_episodes, in order
    episodes = _episodes_from_logs(envs)
    assert sorted(episodes) == list(range(7))
    for seed, actions in episodes.items():
        actions = np.array(actions)
        assert len(actions) == 4 + seed % 5
        # column 0: the step index the policy saw + row -> equals the executed step: chunks run in order
        np.testing.assert_array_equal(actions[:, 0], np.arange(len(actions)))
        # column 1: the row within the chunk: 0,1,2 then a fresh query; a new episode starts at row 0
        np.testing.assert_array_equal(actions[:, 1], np.arange(len(actions)) % 3)
    assert [(e.success, e.steps) for e in report.episodes] == [(k % 2 == 0, 4 + k % 5) for k in range(7)]
    # every new episode reset the policy for its env only
    reset_ids = [i for options in policy.resets for i in options["env_ids"]]
    assert len(reset_ids) == 7 and set(reset_ids) == set(range(n_envs))


def test_results_do_not_depend_on_n_envs_over_a_real_server():
    server = PolicyServer(StepIndexPolicy(HORIZON), port=0, verbose=False)
    port = server.start()
    client = PolicyClient("127.0.0.1", port, timeout_ms=5000)
    try:
        results = []
        for n_envs in (1, 2):
            report = run_rollout(client, _config(n_envs=n_envs), envs=[CounterEnv() for _ in range(n_envs)])
            results.append([e.to_dict() | {"env_id": None} for e in report.episodes])
            assert report.timing["policy_queries"] > 0 and 0 < report.timing["policy_share"] < 1
    finally:
        client.close()
        server.stop()
    assert results[0] == results[1]


def test_chunker_unit_behaviour():
    chunker = ActionChunker(2, ChunkingConfig(n_action_steps=2))
    assert chunker.remaining(0) == chunker.available(0) == 0
    chunk = np.arange(2 * 4, dtype=np.float32).reshape(2, 4, 1)
    chunker.set_chunks(chunk, [0, 1])
    assert chunker.pop(0)[0] == 0 and chunker.pop(1)[0] == 4
    chunker.reset([1])  # env 1 finished mid-chunk
    assert chunker.remaining(1) == chunker.available(1) == 0 and chunker.step(1) == 0
    assert chunker.remaining(0) == 1 and chunker.available(0) == 3
    assert chunker.pop(0)[0] == 1
    assert chunker.remaining(0) == 0 and chunker.available(0) == 2  # window used up; the chunk covers 2 more
    assert chunker.pop(0)[0] == 2 and chunker.pop(0)[0] == 3
    with pytest.raises(RuntimeError, match="no action for step 4"):
        chunker.pop(0)
    with pytest.raises(ConfigError, match="n_action_steps=5 exceeds the policy's action horizon 4"):
        ActionChunker(1, ChunkingConfig(n_action_steps=5)).set_chunks(chunk[:1], [0])


def test_chunks_are_aligned_to_the_step_they_were_computed_for():
    chunker = ActionChunker(1, ChunkingConfig(n_action_steps=4))
    chunker.set_chunks(np.arange(8, dtype=np.float32).reshape(1, 8, 1), [0])  # steps 0..7
    for _ in range(3):
        chunker.pop(0)
    # a late reply computed for step 1: the actions of steps 1 and 2 have passed; step 3 is its row 2
    chunker.set_chunks(100 + np.arange(8, dtype=np.float32).reshape(1, 8, 1), [0], start_steps=[1])
    assert chunker.pop(0)[0] == 102 and chunker.remaining(0) == 1  # window: steps 1..4
    # a reply for a later step (a replay cursor ahead): the current chunk runs until that step
    chunker.set_chunks(200 + np.arange(8, dtype=np.float32).reshape(1, 8, 1), [0], start_steps=[6], window=2)
    assert [chunker.pop(0)[0] for _ in range(4)] == [103, 104, 200, 201]
    assert chunker.remaining(0) == 0 and chunker.available(0) == 6
    with pytest.raises(ChunkSyncError, match="chunk for step 20 but the env is at step 8 with actions only up to "
                                             "step 13"):
        chunker.set_chunks(np.zeros((1, 8, 1), np.float32), [0], start_steps=[20])
    with pytest.raises(ChunkSyncError, match="computed for step 0 .* arrived at step 8"):
        chunker.set_chunks(np.zeros((1, 8, 1), np.float32), [0], start_steps=[0])
    assert chunker.pop(0)[0] == 202  # the failed placements left the queue as it was
    with pytest.raises(ConfigError, match="n_action_steps must be >= 1"):
        ChunkingConfig(n_action_steps=0)


def test_temporal_ensembling_averages_overlapping_chunks():
    coef = 0.5
    chunker = ActionChunker(1, ChunkingConfig(n_action_steps=1, ensemble_coef=coef))
    chunker.set_chunks(np.array([[[0.0], [10.0], [20.0]]]), [0])
    assert chunker.pop(0)[0] == 0.0
    chunker.set_chunks(np.array([[[100.0], [200.0], [300.0]]]), [0])
    w = np.exp(-coef * np.arange(2))
    assert chunker.pop(0)[0] == pytest.approx((10 * w[0] + 100 * w[1]) / w.sum())
    chunker.set_chunks(np.array([[[1000.0], [0.0], [0.0]]]), [0])
    w = np.exp(-coef * np.arange(3))
    assert chunker.pop(0)[0] == pytest.approx((20 * w[0] + 200 * w[1] + 1000 * w[2]) / w.sum())


def test_wilson_interval():
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(5, 5)[1] == 1.0
