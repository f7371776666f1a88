"""PolicyDriver: batched envs, per-env resets, chunk alignment, async inference with a slow policy, torch in/out.

Policies are real BasePolicy subclasses served on loopback; envs are real (a counting env for exact timelines,
MuJoCo Franka envs for the replay and vector-env checks).
"""

from __future__ import annotations

import time

import gymnasium as gym
import numpy as np
import pytest

from policyserve import DriverConfig, PolicyDriver
from policyserve.client.connect import ServerUnavailableError
from policyserve.errors import ConfigError, ValidationError
from policyserve.policies.base import BasePolicy, PolicyWrapper

from helpers import StepIndexPolicy

HORIZON = 16
LATENCY_S = 0.1


class SlowPolicy(PolicyWrapper):
    """Any policy, answering ``latency_s`` later."""

    def __init__(self, policy: BasePolicy, latency_s: float = LATENCY_S) -> None:
        super().__init__(policy, strict=False)
        self.latency_s = latency_s

    def _get_action(self, observation, options=None):
        time.sleep(self.latency_s)
        return self.policy.get_action(observation, options)


def counter_obs(steps: list[int]) -> dict:
    return {"step": np.array(steps, np.float64)[:, None], "task": ["count"] * len(steps)}


def run_counter(driver: PolicyDriver, n_steps: int, step_s: float = 0.0, reset_at: dict | None = None):
    """Step ``driver.n_envs`` counting envs; ``reset_at[t] = [env ids]`` restart those envs after tick t."""
    steps = [0] * driver.n_envs
    log: list[list[tuple[int, float, float]]] = [[] for _ in steps]
    for t in range(n_steps):
        actions = driver.act(counter_obs(steps))
        time.sleep(step_s)
        for i, action in enumerate(actions):
            log[i].append((steps[i], float(action[0]), float(action[1])))
            steps[i] += 1
        for i in (reset_at or {}).get(t, []):
            steps[i] = 0
            driver.reset([i])
    return log


def key_map():
    from policyserve.client.adapter import KeyMap

    return KeyMap(video={}, language="task")


def test_sync_driver_executes_n_action_steps_per_query_and_resets_envs_individually(serve):
    policy = StepIndexPolicy(HORIZON)
    served = serve(policy)
    driver = PolicyDriver(served.client, 2, DriverConfig(n_action_steps=4, key_map=key_map()), action_dim=2)
    log = run_counter(driver, 14, reset_at={5: [1]})
    driver.close()
    env0 = np.array(log[0])
    np.testing.assert_array_equal(env0[:, 1], np.arange(14))  # every action belongs to its step
    np.testing.assert_array_equal(env0[:, 2], np.arange(14) % 4)  # rows 0..3, then a fresh chunk
    env1 = np.array(log[1])
    np.testing.assert_array_equal(env1[:, 1], env1[:, 0])
    np.testing.assert_array_equal(env1[6:, 2], np.arange(8) % 4)  # restarted after step 5: fresh chunk at row 0
    assert policy.resets == [{"env_ids": [0, 1]}, {"env_ids": [1]}]
    assert driver.stats.resets == 2 and driver.stats.queries >= 14 // 4


def test_async_driver_keeps_stepping_while_a_slow_policy_answers_and_drops_passed_actions(serve):
    """100 ms per reply, 20 ms per env step, 8 actions per query: the loop waits only for the first chunk."""
    served = serve(StepIndexPolicy(HORIZON, latency_s=LATENCY_S))
    config = DriverConfig(n_action_steps=8, key_map=key_map(), async_inference=True)
    with PolicyDriver(served.client, 2, config, action_dim=2) as driver:
        log = run_counter(driver, 40, step_s=0.02)
        stats = driver.stats
    for env_log in log:
        actions = np.array(env_log)
        np.testing.assert_array_equal(actions[:, 1], actions[:, 0])  # aligned to the step it was computed for
        rows = actions[:, 2]
        switches = np.flatnonzero(rows[1:] != rows[:-1] + 1) + 1
        assert len(switches) >= 3 and all(rows[s] >= 1 for s in switches)  # late chunks lost their past actions
    assert stats.queries >= 4
    # only the first chunk (nothing to execute yet) was waited for: later replies arrived while stepping
    assert stats.wait_time_s < 2 * LATENCY_S + 0.1 < stats.policy_time_s


def test_torch_tensors_in_torch_tensor_out():
    torch = pytest.importorskip("torch")
    driver = PolicyDriver(StepIndexPolicy(HORIZON), 3, DriverConfig(n_action_steps=2, key_map=key_map()), action_dim=2)
    obs = counter_obs([4, 5, 6])
    obs["step"] = torch.as_tensor(obs["step"])
    actions = driver.act(obs)
    assert isinstance(actions, torch.Tensor) and actions.shape == (3, 2) and actions.device == obs["step"].device
    assert actions[:, 0].tolist() == [4.0, 5.0, 6.0]
    assert isinstance(driver.act(counter_obs([5, 6, 7])), np.ndarray)


def test_driver_errors_name_the_parameter_and_keep_the_driver_usable(serve):
    served = serve(StepIndexPolicy(HORIZON))
    driver = PolicyDriver(served.client, 2, DriverConfig(n_action_steps=4, key_map=key_map()), action_dim=2)
    with pytest.raises(ConfigError, match=r"env_ids \[2\] out of range: the driver has n_envs=2"):
        driver.reset([2])
    with pytest.raises(ConfigError, match=r"reset options\['episode_index'\] has 3 entries for 2 env_ids"):
        driver.reset([0, 1], {"episode_index": [1, 2, 3]})
    with pytest.raises(ValidationError, match=r"state\['step'\] missing in the env observation.*env keys \['task'\]"):
        driver.act({"task": ["count", "count"]})
    with pytest.raises(ValidationError, match=r"leading axis 2"):
        driver.act(counter_obs([0, 1, 2]))
    with pytest.raises(ValidationError, match=r"total dimension 3 \(the env's action size\)"):
        PolicyDriver(served.client, 2, DriverConfig(key_map=key_map()), action_dim=3).act(counter_obs([0, 0]))
    with pytest.raises(ConfigError, match="n_action_steps=17 exceeds the policy's action horizon 16"):
        PolicyDriver(served.client, 2, DriverConfig(n_action_steps=17, key_map=key_map())).act(counter_obs([0, 0]))
    with pytest.raises(ConfigError, match="async_threshold must be an integer >= 0"):
        DriverConfig(async_threshold=-1)
    assert driver.act(counter_obs([0, 0])).shape == (2, 2)  # still works after the bad calls
    driver.close()
    with pytest.raises(ServerUnavailableError, match="no policy server answering at tcp://127.0.0.1"):
        PolicyDriver.connect("127.0.0.1", _closed_port())


def _closed_port() -> int:
    from policyserve.launch import free_port

    return free_port()


# ---------------------------------------------------------------------------------------------- MuJoCo


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    """Two recorded scripted lift demos of different lengths and their LeRobot dataset."""
    from policyserve.data.hdf5_to_lerobot import convert_hdf5_to_lerobot
    from policyserve.sim.recorder import record_demos

    root = tmp_path_factory.mktemp("driver_demos")
    hdf5 = root / "lift.hdf5"
    summary = record_demos("lift", 2, hdf5, camera_size=(32, 32), seed=0, max_episode_steps=120, progress=False)
    assert summary["demos"] == 2
    convert_hdf5_to_lerobot(hdf5, root / "dataset", progress=False)
    return hdf5, root / "dataset"


@pytest.mark.sim
@pytest.mark.parametrize("async_inference", [False, True])
def test_replayed_demos_from_their_recorded_states_succeed_with_a_100ms_policy(demos, serve, async_inference):
    from policyserve.eval.envs import EnvConfig
    from policyserve.sim.envs import FrankaEnvConfig
    from policyserve.eval.rollout import RolloutConfig, run_rollout
    from policyserve.policies.replay import make_replay_policy

    hdf5, dataset = demos
    served = serve(SlowPolicy(make_replay_policy(dataset, 8, embodiment_tag="franka_panda")))
    config = RolloutConfig(env=EnvConfig(task="lift", sim=FrankaEnvConfig(camera_size=(32, 32))),
                           driver=DriverConfig(n_action_steps=8, async_inference=async_inference),
                           n_episodes=3, n_envs=2, max_episode_steps=120, hdf5_path=str(hdf5), demo_indices=[0, 1],
                           progress=False)
    report = run_rollout(served.client, config)
    # episodes of different lengths: envs restart mid-chunk of the other while its replay cursor keeps going
    assert [e.demo_index for e in report.episodes] == [0, 1, 0]
    assert all(e.success for e in report.episodes), report.summary()
    if async_inference:
        assert report.timing["policy_wait_s"] < report.timing["policy_time_s"]


@pytest.mark.sim
def test_readme_loop_with_a_gymnasium_vector_env(serve):
    """The README's PolicyDriver loop (scripted expert server, same-step autoreset vector env)."""
    from policyserve.sim import make_vec_env
    from policyserve.sim.scripted import make_scripted_policy

    served = serve(make_scripted_policy("lift"))
    envs = make_vec_env("lift", 2, async_=False, autoreset_mode="SameStep", camera_names=(), max_episode_steps=80)
    successes, finished = np.zeros(2, int), np.zeros(2, int)
    with PolicyDriver.connect("127.0.0.1", served.port, n_envs=2, config=DriverConfig(n_action_steps=1)) as driver:
        obs, info = envs.reset(seed=0)
        for _ in range(150):
            obs, reward, terminated, truncated, info = envs.step(driver.act(obs))
            done = np.flatnonzero(terminated | truncated)
            if len(done):  # same-step autoreset: obs/info are the new episode's, the last step's info is final_info
                successes[done] += np.asarray(info["final_info"]["success"])[done]
            finished[done] += 1
            if len(done):
                driver.reset(done)
    envs.close()
    assert finished.sum() >= 2 and successes.sum() >= 2
    assert driver.stats.resets >= 2


class ArmEcho(BasePolicy):
    """A two-arm policy (camera, left/right arm state, language) whose action row echoes the state it got:
    [left_arm[0], right_arm[0], len(instruction)]."""

    def get_modality_config(self):
        from policyserve.types import ModalityConfig

        return {"video": ModalityConfig([0], ["ego_view"]), "state": ModalityConfig([0], ["left_arm", "right_arm"]),
                "action": ModalityConfig(list(range(4)), ["arms"]),
                "language": ModalityConfig([0], ["task_description"])}

    def _get_action(self, observation, options=None):
        left, right = observation["state"]["left_arm"][:, -1], observation["state"]["right_arm"][:, -1]
        assert left.shape[1] == 7 and right.shape[1] == 7 and observation["video"]["ego_view"].shape[2:] == (8, 8, 3)
        text = np.array([len(t[0]) for t in observation["language"]["task_description"]], np.float32)
        row = np.stack([left[:, 0], right[:, 0], text], axis=-1)
        return {"arms": np.repeat(row[:, None], 4, axis=1).astype(np.float32)}, {}


def test_isaaclab_case_torch_obs_own_keys_no_instruction_over_a_real_server(serve):
    """The README's IsaacLab case: torch observations with the env's own keys, one joint vector sliced into the
    policy's two arms, no instruction text in the env: torch actions back, on the observation's device."""
    torch = pytest.importorskip("torch")
    from policyserve.client.keymap import KeyMap

    served = serve(ArmEcho())
    key_map = KeyMap(video={"rgb": "ego_view"}, state={"joint_pos[0:7]": "left_arm", "joint_pos[7:14]": "right_arm"},
                     instruction="pick the cube")
    joint_pos = torch.arange(3 * 14, dtype=torch.float32).reshape(3, 14)
    obs = {"rgb": torch.zeros((3, 8, 8, 3), dtype=torch.uint8), "joint_pos": joint_pos}
    with PolicyDriver.connect("127.0.0.1", served.port, n_envs=3, config=DriverConfig(n_action_steps=2,
                                                                                      key_map=key_map)) as driver:
        assert driver.check(obs, show=False).startswith("key map OK")
        actions = driver.act(obs)
    assert isinstance(actions, torch.Tensor) and actions.shape == (3, 3)
    np.testing.assert_array_equal(actions[:, 0].numpy(), joint_pos[:, 0].numpy())
    np.testing.assert_array_equal(actions[:, 1].numpy(), joint_pos[:, 7].numpy())
    assert actions[:, 2].tolist() == [len("pick the cube")] * 3


def test_driver_check_prints_a_ready_to_edit_key_map_template(serve, capsys):
    import json

    from policyserve.client.keymap import KeyMap

    driver = PolicyDriver(serve(ArmEcho()).client, 2)
    obs = {"rgb": np.zeros((2, 8, 8, 3), np.uint8), "joint_pos": np.zeros((2, 14), np.float32)}
    text = driver.check(obs)
    assert text in capsys.readouterr().out
    assert "all 4 missing" in text and "KeyMap(instruction=" in text
    template = json.loads(text.split("\n# key map")[1].split("\n", 1)[1].split("\n# env")[0])
    assert template["state"] == {"?2": "left_arm", "?3": "right_arm"}
    template["video"] = {"rgb": "ego_view"}
    template["state"] = {"joint_pos[0:7]": "left_arm", "joint_pos[7:14]": "right_arm"}
    edited = PolicyDriver(driver.policy, 2, DriverConfig(key_map=KeyMap.from_dict(template)))
    assert edited.check(obs, show=False).startswith("key map OK")
    driver.close()
