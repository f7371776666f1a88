"""Seeded sampling through PolicyDriver: an integer base seed gives every query of an episode its own seed.

One fixed seed sent with every query would give every chunk of a run the same noise (one draw evaluated, not
the sampling policy); the driver derives each env row's seed from (base seed, episode seed, query index).
"""

from __future__ import annotations

import numpy as np
import pytest

from policyserve import DriverConfig, PolicyDriver
from policyserve.client.driver import query_seed
from policyserve.client.keymap import KeyMap
from policyserve.errors import ConfigError

from helpers import StepIndexPolicy

H, S = 8, 4


class SeedRecorder(StepIndexPolicy):
    """StepIndexPolicy that records the ``seed`` option of every query."""

    def __init__(self) -> None:
        super().__init__(H)
        self.seeds: list = []

    def _get_action(self, observation, options=None):
        self.seeds.append((options or {}).get("seed"))
        return super()._get_action(observation, options)


def run(n_envs: int, seeds, n_steps: int, base=7) -> SeedRecorder:
    policy = SeedRecorder()
    driver = PolicyDriver(policy, n_envs, DriverConfig(n_action_steps=S, key_map=KeyMap(video={}, language="task"),
                                                       action_options=None if base is None else {"seed": base}),
                          action_dim=2)
    driver.reset(seeds=seeds)
    for t in range(n_steps):
        driver.act({"step": np.full((n_envs, 1), t, np.float64), "task": ["count"] * n_envs})
    return policy


def test_each_query_of_an_episode_gets_its_own_seed_from_base_episode_and_index() -> None:
    policy = run(1, [100], 3 * S)
    assert policy.seeds == [[query_seed(7, 100, k)] for k in range(3)]
    assert len({s[0] for s in policy.seeds}) == 3  # fresh noise for every chunk
    assert run(1, [100], 3 * S).seeds == policy.seeds  # the same run repeats exactly


def test_a_rows_seeds_depend_on_its_episode_not_on_its_env_slot_or_the_env_count() -> None:
    two = run(2, [100, 200], 2 * S)
    assert [s[0] for s in two.seeds] == [query_seed(7, 100, k) for k in range(2)]
    assert [s[1] for s in two.seeds] == [query_seed(7, 200, k) for k in range(2)]
    swapped = run(2, [200, 100], 2 * S)
    assert [s[::-1] for s in swapped.seeds] == two.seeds
    assert [[s[0]] for s in two.seeds] == run(1, [100], 2 * S).seeds
    assert query_seed(8, 100, 0) != query_seed(7, 100, 0) != query_seed(7, 101, 0)


def test_unseeded_and_list_seeds_are_sent_as_given() -> None:
    assert run(1, None, 2 * S, base=None).seeds == [None, None]
    without_episode_seeds = run(1, None, 2 * S)  # episodes numbered as they start (the first is 1)
    assert without_episode_seeds.seeds == [[query_seed(7, 1, k)] for k in range(2)]


def test_reset_seeds_of_the_wrong_length_name_both_lengths() -> None:
    driver = PolicyDriver(SeedRecorder(), 2, DriverConfig(n_action_steps=S, key_map=KeyMap(video={}, language="task")),
                          action_dim=2)
    with pytest.raises(ConfigError, match=r"reset seeds has 3 entries for 2 env_ids \[0, 1\]"):
        driver.reset(seeds=[1, 2, 3])


def test_a_sampling_model_samples_fresh_noise_for_each_chunk_and_repeats_under_the_same_seeds(serve) -> None:
    """A real flow-matching model behind a real server: the same observation at query 0 and query 1 of an
    episode gives different chunks (fresh noise), and the same seeds give the same chunks."""
    from policyserve import PolicyClient
    from helpers import franka_observation
    from test_trust import _sampling_model

    served = serve(_sampling_model())
    obs = franka_observation(size=16)
    with PolicyClient(port=served.port) as client:
        def chunk(seed: int) -> np.ndarray:
            return client.get_action(obs, {"seed": [seed]})[0]["arm"]

        first, second = chunk(query_seed(7, 100, 0)), chunk(query_seed(7, 100, 1))
        assert not np.allclose(first, second)
        np.testing.assert_array_equal(first, chunk(query_seed(7, 100, 0)))
