"""The openpi front door, driven by the real ``openpi_client`` (WebsocketClientPolicy, ActionChunkBroker).

Every test starts a real PolicyServer with the openpi websocket door on loopback; every wait is bounded
(threads are joined with limits; openpi's client itself has no receive timeout, so the module has a
pytest timeout).
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
import urllib.request

import msgpack
import numpy as np
import pytest
import websockets
from openpi_client.action_chunk_broker import ActionChunkBroker
from openpi_client.websocket_client_policy import WebsocketClientPolicy

from policyserve import ConfigError, ConstantPolicy, PolicyClient, PolicyServer
from policyserve.wire.openpi_keys import OpenpiKeyMap, OpenpiMapping
from policyserve.serving.doors.openpi import OpenpiFrontDoor
from policyserve.serving.server import AddressInUseError
from policyserve.registry import get_embodiment_spec

from helpers import LANG_KEY, franka_observation
from serve_process import serve_process
from test_serving import GatedPolicy, SlowPolicy, concurrently, wait_for

pytestmark = pytest.mark.timeout(120)  # openpi's client has no receive timeout of its own
SPEC = get_embodiment_spec("franka_panda")
OPENPI_READY = re.compile(r"openpi clients: listening on ws://[\d.]+:(\d+)")


def start(policy, key_map: OpenpiKeyMap | None = None, gr00t: bool = True, **kwargs) -> PolicyServer:
    server = PolicyServer(policy, port=0 if gr00t else None, verbose=False, **kwargs)
    server.add_front_door(OpenpiFrontDoor(port=0, key_map=key_map))
    server.start()
    return server


def door_port(server: PolicyServer) -> int:
    return next(d.port for d in server.front_doors if isinstance(d, OpenpiFrontDoor))


def connect(server: PolicyServer, api_key: str | None = None) -> WebsocketClientPolicy:
    return WebsocketClientPolicy("127.0.0.1", door_port(server), api_key=api_key)


def franka_openpi_obs(seed: int = 0, size: int = 32) -> dict:
    """The openpi (DROID/LIBERO-style) observation equal to :func:`franka_observation` of batch 1."""
    nested = franka_observation(batch=1, size=size)
    return {
        "observation/image": nested["video"]["ego_view"][0, 0],
        "observation/wrist_image": nested["video"]["wrist_view"][0, 0],
        "observation/state": np.concatenate([nested["state"][k][0, 0] for k in ("eef_pos", "eef_quat",
                                                                                  "gripper_pos")]),
        "prompt": "lift the cube",
    }


def concat_actions(action: dict, keys: list[str]) -> np.ndarray:
    return np.concatenate([action[k][0] for k in keys], axis=-1)


# -- the built-in policies over openpi ---------------------------------------------------------------------
def test_constant_policy_answers_openpi_like_the_gr00t_wire():
    policy = ConstantPolicy(SPEC.modality_configs, SPEC.dims)
    server = start(policy)
    try:
        client = connect(server)
        meta = client.get_server_metadata()
        assert meta["observation_keys"] == ["observation/image", "observation/state", "observation/wrist_image",
                                            "prompt"]
        assert meta["action_keys"] == {"actions": ["arm", "gripper"]} and meta["action_horizon"] == 16
        assert meta["action_dims"] == {"actions": 7} and meta["state_sizes"] == {"observation/state": 9}
        first = client.infer(franka_openpi_obs())
        second = client.infer(franka_openpi_obs())
        with PolicyClient(port=server.port, timeout_ms=5000) as gr00t:
            action, _ = gr00t.get_action(franka_observation(batch=1))
        expected = concat_actions(action, ["arm", "gripper"])
        assert first["actions"].shape == (16, 7) and first["actions"].dtype == np.float32
        np.testing.assert_array_equal(first["actions"], expected)
        assert set(first) == {"actions", "server_timing"}
        timing = first["server_timing"]
        assert timing["infer_ms"] == timing["policy_ms"] >= 0 and timing["merged_requests"] == 1
        assert "prev_total_ms" not in timing and second["server_timing"]["prev_total_ms"] > 0
    finally:
        server.stop(10)


def test_scripted_expert_over_openpi_equals_the_local_policy():
    from policyserve.sim.scripted import make_scripted_policy

    server = start(make_scripted_policy("lift"))
    local = make_scripted_policy("lift")
    try:
        client = connect(server)
        assert client.get_server_metadata()["state_sizes"] == {"observation/state": 12}
        rng = np.random.default_rng(1)
        for _ in range(3):  # the expert keeps its phase between calls, per client
            state = {"eef_pos": rng.uniform(-0.1, 0.1, 3), "eef_quat": np.array([0, 0, 0, 1.0]),
                     "gripper_pos": np.array([0.04, -0.04]), "cube_pos": rng.uniform(-0.1, 0.1, 3) + [0, 0, 0.8]}
            flat = np.concatenate(list(state.values()))  # float64, as openpi clients usually send
            reply = client.infer({"observation/state": flat, "prompt": "lift the cube"})
            nested = {"video": {}, "state": {k: v.astype(np.float32)[None, None] for k, v in state.items()},
                      "language": {LANG_KEY: [["lift the cube"]]}}
            action, _ = local.get_action(nested)
            np.testing.assert_array_equal(reply["actions"], concat_actions(action, ["arm", "gripper"]))
    finally:
        server.stop(10)


def test_replay_of_the_gr1_dataset_with_a_key_map_file(gr1_dataset_path, tmp_path):
    from policyserve.policies.replay import make_replay_policy

    policy = make_replay_policy(gr1_dataset_path, None)
    state_keys = policy.dataset.state_keys
    spec = policy.dataset.modality.state
    key_map_file = tmp_path / "gr1_openpi.json"
    key_map_file.write_text(json.dumps({
        "video": {"observation/image": "ego_view_bg_crop_pad_res256_freq20"},
        "state": {"observation/state": state_keys},
        "dims": {k: spec[k].end - spec[k].start for k in state_keys},
        "default_prompt": "pick the object",
    }))
    server = start(policy, key_map=OpenpiKeyMap.from_file(key_map_file))
    try:
        client = connect(server)
        obs = {"observation/image": np.zeros((16, 16, 3), np.uint8), "observation/state": np.zeros(44, np.float32)}
        first, second = client.infer(obs), client.infer(obs)  # no prompt: the key map's default_prompt
        recorded = policy.dataset.load_actions(policy.dataset.episode_indices[0], policy.action_keys)
        flat = np.concatenate([recorded[k] for k in policy.action_keys], axis=-1)
        assert first["actions"].shape == (16, 44)
        np.testing.assert_array_equal(first["actions"], flat[:16])
        np.testing.assert_array_equal(second["actions"], flat[16:32])  # the replay cursor advanced
    finally:
        server.stop(10)


def test_trained_model_over_openpi_equals_the_local_call():
    pytest.importorskip("torch")
    from test_model_serve import _untrained_model_policy

    policy = _untrained_model_policy()
    policy.seed = 5
    policy.reset()
    server = start(policy)
    try:
        client = connect(server)
        obs = franka_openpi_obs(size=16)
        reply = client.infer(obs)
        policy.reset()  # the same noise again for the local call
        nested = franka_observation(batch=1, size=16)
        action, _ = policy.get_action(nested)
        assert reply["actions"].shape == (16, 7) and np.isfinite(reply["actions"]).all()
        np.testing.assert_allclose(reply["actions"], concat_actions(action, ["arm", "gripper"]), atol=1e-5)
    finally:
        server.stop(10)


# -- errors keep the connection usable ---------------------------------------------------------------------
def test_bad_input_gets_a_text_error_and_the_connection_keeps_serving():
    server = start(ConstantPolicy(SPEC.modality_configs, SPEC.dims), max_message_bytes=200_000)
    try:
        client = connect(server)
        good = franka_openpi_obs()
        bad_cases = [
            ({k: v for k, v in good.items() if k != "observation/wrist_image"},
             "openpi observation['observation/wrist_image']: expected a (H, W, C) uint8 image, got missing"),
            ({**good, "observation/state": np.zeros(8)},
             "openpi observation['observation/state']: expected a state vector of 9 values (eef_pos 3 + eef_quat 4 "
             "+ gripper_pos 2), got shape (8,) dtype float64"),
            ({**good, "observation/image": good["observation/image"].astype(np.float32)},
             "openpi observation['observation/image']: expected a (H, W, C) uint8 image, got shape (32, 32, 3) "
             "dtype float32"),
            ({**good, "prompt": 3}, "openpi observation['prompt']: expected a str instruction, got int 3"),
            ({**good, "observation/image": np.zeros((32, 32, 4), np.uint8)}, "video['ego_view']: expected 3 channels"),
            ({**good, "observation/image": np.zeros((300, 300, 3), np.uint8)},
             "exceeds the server's max_message_bytes=200000"),
        ]
        for obs, message in bad_cases:
            with pytest.raises(RuntimeError, match=re.escape(message)):
                client.infer(obs)
            assert client.infer(good)["actions"].shape == (16, 7)  # same connection, still serving
        for raw, message in [(b"\xc1not msgpack", "message is not valid msgpack-numpy"),
                             ("a text frame", "expected a binary msgpack-numpy frame, got a text frame"),
                             (msgpack.packb({"x": {b"__ndarray__": True, b"data": b"12345678", b"dtype": "|O",
                                                   b"shape": [1]}}), "array dtype '|O' is not allowed")]:
            client._ws.send(raw)
            reply = client._ws.recv(timeout=5)
            assert isinstance(reply, str) and message in reply, reply
            assert client.infer(good)["actions"].shape == (16, 7)
    finally:
        server.stop(10)


def test_a_message_over_four_times_the_limit_closes_only_that_connection():
    server = start(ConstantPolicy(SPEC.modality_configs, SPEC.dims), max_message_bytes=50_000)
    try:
        client, other = connect(server), connect(server)
        huge = {**franka_openpi_obs(), "observation/image": np.zeros((300, 300, 3), np.uint8)}  # 270 kB > 4 x 50 kB
        with pytest.raises(websockets.ConnectionClosedError, match="1009"):
            client.infer(huge)
        assert other.infer(franka_openpi_obs())["actions"].shape == (16, 7)
        assert connect(server).infer(franka_openpi_obs())["actions"].shape == (16, 7)
    finally:
        server.stop(10)


def test_openpi_wire_format_of_malformed_arrays_is_refused_by_name():
    from policyserve.errors import ProtocolError
    from policyserve.wire import openpi as openpi_codec

    bogus = openpi_codec.packb({"a": np.zeros(3, np.float32)}).replace(b"\xc4\x0c", b"\xc4\x0b", 1)[:-1]
    with pytest.raises(ProtocolError):
        openpi_codec.unpackb(bogus)
    short = {b"__ndarray__": True, b"data": b"\0" * 8, b"dtype": "<f4", b"shape": [3]}
    with pytest.raises(ProtocolError, match=r"shape \(3,\) and dtype <f4 needs 12 bytes of data, got 8"):
        openpi_codec.unpackb(msgpack.packb(short))


def test_api_key_is_required_through_openpis_authorization_header():
    server = start(ConstantPolicy(SPEC.modality_configs, SPEC.dims), api_token="s3cret")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{door_port(server)}/healthz", timeout=5) as health:
            assert health.status == 200 and health.read() == b"OK\n"  # health checks need no token
        for key in (None, "wrong"):
            with pytest.raises(websockets.InvalidStatus, match="401"):
                connect(server, api_key=key)
        client = connect(server, api_key="s3cret")
        assert client.infer(franka_openpi_obs())["actions"].shape == (16, 7)
        with PolicyClient(port=server.port, timeout_ms=5000, api_token="s3cret") as gr00t:
            assert gr00t.ping()
    finally:
        server.stop(10)


# -- one scheduler for both protocols ----------------------------------------------------------------------
def test_gr00t_and_openpi_clients_are_merged_into_one_policy_call():
    policy = GatedPolicy()  # a third client's call holds the worker while both requests queue behind it
    server = start(policy)
    try:
        client, blocker = connect(server), connect(server)
        with PolicyClient(port=server.port, timeout_ms=20000) as gr00t:
            first = threading.Thread(target=lambda: blocker.infer(franka_openpi_obs()))
            first.start()
            wait_for(lambda: policy.entered == 1, "the blocking call is running")
            openpi_obs = franka_openpi_obs()
            openpi_obs["observation/state"][0] = 7.0  # SlowPolicy echoes eef_pos[0] into the arm action
            gr00t_obs = franka_observation(batch=1)
            gr00t_obs["state"]["eef_pos"][:] = 3.0

            def release_when_both_queued():
                wait_for(lambda: server.scheduler.queued == 2, "both requests are queued")
                policy.gate.set()

            openpi_reply, (gr00t_action, gr00t_info), _ = concurrently(
                [lambda: client.infer(openpi_obs), lambda: gr00t.get_action(gr00t_obs), release_when_both_queued])
            first.join(10)
        assert openpi_reply["server_timing"]["merged_requests"] == 2
        assert gr00t_info["server_timing"]["merged_requests"] == 2
        assert np.all(openpi_reply["actions"][:, :6] == 7.0) and np.all(gr00t_action["arm"] == 3.0)
        assert [rows for what, _, rows in policy.log if what == "get_action"] == [1, 2]
    finally:
        policy.gate.set()
        server.stop(10)


def test_episode_start_control_message_resets_only_this_connection():
    policy = SlowPolicy(delay=0.0)
    server = start(policy)
    try:
        client = connect(server)
        assert client.infer({"__ctrl__": "episode_start"}) == {"__ack__": "episode_start"}
        assert client.infer({"__ctrl__": "episode_end"}) == {"__ack__": "episode_end"}
        assert client.infer({"__ctrl__": "something"}) == {"__ack__": "ignored"}
        assert [what for what, _, _ in policy.log] == ["reset"]
    finally:
        server.stop(10)


# -- shutdown and ports ------------------------------------------------------------------------------------
def test_stop_answers_the_call_in_progress_then_closes_openpi_connections():
    policy = GatedPolicy()  # the worker is held in the first call until the server is shutting down
    server = start(policy, gr00t=False)
    port = door_port(server)
    client, waiting = connect(server), connect(server)
    results: dict = {}

    def infer(name, c):
        try:
            results[name] = c.infer(franka_openpi_obs())
        except Exception as exc:  # noqa: BLE001 - checked below
            results[name] = exc

    threads = [threading.Thread(target=infer, args=("first", client))]
    threads[0].start()
    wait_for(lambda: policy.entered == 1, "the first call is running")
    threads.append(threading.Thread(target=infer, args=("queued", waiting)))
    threads[1].start()
    wait_for(lambda: server.scheduler.queued == 1, "the second request is queued behind it")
    stopped: list = []
    stopper = threading.Thread(target=lambda: stopped.append(server.stop(10)))
    stopper.start()
    wait_for(lambda: server.scheduler._closed, "the scheduler is shutting down")
    policy.gate.set()
    stopper.join(20)
    assert stopped == [True] and server.closed
    for t in threads:
        t.join(10)
    assert results["first"]["actions"].shape == (16, 7)  # finished and answered
    assert isinstance(results["queued"], RuntimeError) and "server shutting down" in str(results["queued"])
    with pytest.raises(websockets.ConnectionClosed):
        client.infer(franka_openpi_obs())
    with pytest.raises(OSError):
        WebsocketClientPolicy("127.0.0.1", port)
    # the port is free again
    again = PolicyServer(ConstantPolicy(SPEC.modality_configs, SPEC.dims), port=None, verbose=False)
    again.add_front_door(OpenpiFrontDoor(port=port))
    again.start()
    assert connect(again).infer(franka_openpi_obs())["actions"].shape == (16, 7)
    assert again.stop(10)


def test_a_taken_openpi_port_fails_the_bind_and_leaves_nothing_open():
    first = start(ConstantPolicy(SPEC.modality_configs, SPEC.dims))
    try:
        second = PolicyServer(ConstantPolicy(SPEC.modality_configs, SPEC.dims), port=0, verbose=False)
        second.add_front_door(OpenpiFrontDoor(port=door_port(first)))
        with pytest.raises(AddressInUseError, match=f"port {door_port(first)} on 127.0.0.1 is in use"):
            second.bind()
        assert second.closed
    finally:
        first.stop(10)


def test_key_map_errors_name_the_key():
    configs, dims = SPEC.modality_configs, SPEC.dims
    with pytest.raises(ConfigError, match=r"the policy's video key\(s\) \['wrist_view'\] are fed by no openpi key"):
        OpenpiMapping(OpenpiKeyMap(video={"observation/image": "ego_view"}), configs, dims)
    with pytest.raises(ConfigError, match=r"state key\(s\) \['joints'\] are not state keys of the policy"):
        OpenpiMapping(OpenpiKeyMap(state={"observation/state": ["eef_pos", "joints"]}), configs, dims)
    with pytest.raises(ConfigError, match=r"the size of \['eef_quat', 'gripper_pos'\] is unknown"):
        OpenpiMapping(OpenpiKeyMap(dims={"eef_pos": 3}), configs, None)
    with pytest.raises(ConfigError, match=r"actions\['actions'\] names \['base'\]"):
        OpenpiMapping(OpenpiKeyMap(actions={"actions": ["arm", "base"]}), configs, dims)
    with pytest.raises(ConfigError, match="unknown entries \\['image'\\]"):
        OpenpiKeyMap.from_dict({"image": {}})
    # each state key on its own openpi key needs no sizes
    mapping = OpenpiMapping(OpenpiKeyMap(state={"observation/state": ["eef_pos"], "observation/quat": "eef_quat",
                                                "observation/gripper": ["gripper_pos"]}), configs, None)
    assert set(mapping.state_sizes.values()) == {None}


# -- the CLI -----------------------------------------------------------------------------------------------
def test_cli_protocol_openpi_serves_only_openpi_with_a_key_map_and_stops_on_sigterm(tmp_path):
    key_map = tmp_path / "map.json"
    key_map.write_text(json.dumps({"video": {"cam_high": "ego_view", "cam_wrist": "wrist_view"},
                                   "actions": {"actions": ["arm", "gripper"], "gripper": ["gripper"]}}))
    with serve_process("--protocol", "openpi", "--openpi-key-map", str(key_map), ready=OPENPI_READY) as (proc, port):
        assert "openpi port: 0" in proc.banner and "  Port:" not in proc.banner
        assert "Server is ready and listening on tcp" not in proc.banner  # no GR00T socket
        client = WebsocketClientPolicy("127.0.0.1", port)
        obs = franka_openpi_obs()
        obs["cam_high"], obs["cam_wrist"] = obs.pop("observation/image"), obs.pop("observation/wrist_image")
        reply = client.infer(obs)
        assert reply["actions"].shape == (16, 7) and reply["gripper"].shape == (16, 1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0


def test_cli_bad_openpi_flags_fail_with_one_line(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"state": {"observation/state": 5}}))
    cases = [
        (["--openpi-port", "0", "--openpi-key-map", str(bad)], "error: " + str(bad) + ": state['observation/state']: "
         "expected a GR00T key or a non-empty list of keys, got 5"),
        (["--openpi-key-map", str(bad)], "error: --openpi-key-map needs --openpi-port or --protocol openpi"),
        (["--openpi-port", "0", "--use-sim-policy-wrapper"], "error: --use-sim-policy-wrapper is for GR00T sim"),
    ]
    for flags, message in cases:
        out = subprocess.run([sys.executable, "-m", "policyserve", "serve", "--port", "0", *flags],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and out.stderr.strip().startswith(message), out.stderr
        assert len(out.stderr.strip().splitlines()) == 1


# -- a closed-loop Lift rollout through ActionChunkBroker --------------------------------------------------
LIFT_STATE = ("eef_pos", "eef_quat", "gripper_pos", "cube_pos")
CHUNK = 8


def _episode(env, seed: int, act, max_steps: int) -> tuple[bool, list[np.ndarray]]:
    """One Lift episode; ``act(obs) -> (7,)``; returns (success, actions executed)."""
    obs, info = env.reset(seed=seed)
    executed = []
    for _ in range(max_steps):
        action = np.asarray(act(obs), dtype=np.float32)
        executed.append(action)
        obs, _, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            break
    return bool(info["success"]), executed


class _Gr00tChunks:
    """Executes the first CHUNK actions of each GR00T-wire chunk (the GR00T rollout's receding horizon)."""

    def __init__(self, client: PolicyClient) -> None:
        self.client, self.chunk, self.step = client, None, CHUNK

    def __call__(self, obs: dict) -> np.ndarray:
        if self.step >= CHUNK:
            nested = {"video": {}, "state": {k: obs[k].astype(np.float32)[None, None] for k in LIFT_STATE},
                      "language": {LANG_KEY: [[obs["task"]]]}}
            action, _ = self.client.get_action(nested)
            self.chunk, self.step = concat_actions(action, ["arm", "gripper"]), 0
        self.step += 1
        return self.chunk[self.step - 1]


@pytest.mark.sim
def test_action_chunk_broker_lift_rollout_matches_the_gr00t_wire_run():
    from policyserve.sim.envs import make_env
    from policyserve.sim.scripted import make_scripted_policy

    seeds, max_steps = (0, 1), 150
    server = start(make_scripted_policy("lift", n_action_steps=CHUNK))
    env = make_env("lift", camera_names=(), max_episode_steps=max_steps)
    try:
        gr00t_runs, openpi_runs = [], []
        with PolicyClient(port=server.port, timeout_ms=10000) as gr00t:
            for seed in seeds:
                gr00t.reset()
                gr00t_runs.append(_episode(env, seed, _Gr00tChunks(gr00t), max_steps))
        client = connect(server)
        broker = ActionChunkBroker(client, action_horizon=CHUNK)
        for seed in seeds:
            assert client.infer({"__ctrl__": "episode_start"}) == {"__ack__": "episode_start"}
            broker.reset()

            def act(obs):
                flat = np.concatenate([obs[k] for k in LIFT_STATE])
                return broker.infer({"observation/state": flat, "prompt": obs["task"]})["actions"]

            openpi_runs.append(_episode(env, seed, act, max_steps))
        assert [s for s, _ in openpi_runs] == [s for s, _ in gr00t_runs]
        assert all(s for s, _ in gr00t_runs), "the scripted expert should lift the cube in both episodes"
        for (_, a), (_, b) in zip(openpi_runs, gr00t_runs):
            np.testing.assert_array_equal(np.stack(a), np.stack(b))  # the very same actions reached the env
    finally:
        env.close()
        server.stop(10)
