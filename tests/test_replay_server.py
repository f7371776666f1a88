"""A replay server on gr1.PickNPlace driven by our client over loopback ZeroMQ."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from policyserve.data.lerobot import LeRobotDataset
from policyserve.errors import ServerError
from policyserve.policies.replay import make_replay_policy
from policyserve.client.policy_client import PolicyClient
from policyserve.serving.server import PolicyServer
from policyserve.types import ModalityConfig


@pytest.fixture()
def client(gr1_dataset_path: Path) -> Iterator[PolicyClient]:
    policy = make_replay_policy(gr1_dataset_path, 8)  # config inferred from modality.json, horizon 16
    server = PolicyServer(policy, host="127.0.0.1", port=0, verbose=False)
    port = server.start()
    client = PolicyClient("127.0.0.1", port, timeout_ms=10000)
    try:
        yield client
    finally:
        client.close()
        server.stop()


def test_replay_over_loopback(client: PolicyClient, gr1_dataset_path: Path) -> None:
    raw = LeRobotDataset(gr1_dataset_path).read_columns(2, ["action"])["action"].astype(np.float32)
    assert client.ping()
    configs = client.get_modality_config()
    assert isinstance(configs["action"], ModalityConfig) and configs["action"].modality_keys[0] == "left_arm"
    info = client.reset({"episode_index": 2, "step_index": 8})
    assert info == {"replay": True, "execution_horizon": 8, "current_step": 8, "episode_index": 2,
                    "episode_length": 470, "num_episodes": 5, "episode_done": False}
    for step in (8, 16):
        action, info = client.get_action(None, {"batch_size": 2})
        served = np.concatenate([action[k] for k in configs["action"].modality_keys], axis=2)
        assert served.shape == (2, 16, 44) and info["current_step"] == step
        np.testing.assert_array_equal(served[1], raw[step:step + 16])

    # a bad request is answered with an error and the server keeps serving
    with pytest.raises(ServerError, match="episode_index 9 is not in dataset"):
        client.reset({"episode_index": 9})
    with pytest.raises(ServerError, match="step_index 500 is out of range for episode 0"):
        client.reset({"episode_index": 0, "step_index": 500})
    action, info = client.get_action(None, {"batch_size": 1})
    assert info["current_step"] == 24 and info["episode_index"] == 2


def test_each_client_keeps_its_own_replay_cursor(client: PolicyClient, gr1_dataset_path: Path) -> None:
    """Two clients of one replay server (e.g. two distributed comparison workers) do not move each other's cursor."""
    raw = {e: LeRobotDataset(gr1_dataset_path).read_columns(e, ["action"])["action"].astype(np.float32)
           for e in (1, 3)}
    keys = client.get_modality_config()["action"].modality_keys
    other = PolicyClient("127.0.0.1", client.port, timeout_ms=10000)
    try:
        assert client.reset({"episode_index": 1, "step_index": 0})["current_step"] == 0
        assert other.reset({"episode_index": 3, "step_index": 40})["episode_index"] == 3
        for step in (0, 8, 16):
            action, info = client.get_action(None, {"batch_size": 1})
            assert (info["episode_index"], info["current_step"]) == (1, step)
            np.testing.assert_array_equal(np.concatenate([action[k] for k in keys], axis=2)[0], raw[1][step:step + 16])
            action, info = other.get_action(None, {"batch_size": 1})
            assert (info["episode_index"], info["current_step"]) == (3, 40 + step)
            np.testing.assert_array_equal(np.concatenate([action[k] for k in keys], axis=2)[0],
                                          raw[3][40 + step:56 + step])
        # a bad reset from one client leaves both cursors where they were
        with pytest.raises(ServerError, match="episode_index 9 is not in dataset"):
            other.reset({"episode_index": 9})
        assert client.get_action(None, {"batch_size": 1})[1]["current_step"] == 24
        assert other.get_action(None, {"batch_size": 1})[1]["current_step"] == 64
    finally:
        other.close()
