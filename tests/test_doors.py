"""The serving layout: doors get a DoorContext, the scheduler answers typed outcomes, each door encodes them."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from policyserve import ConstantPolicy, Gr00tDoor, PolicyServer, ServerConfig
from policyserve.errors import ConfigError, ProtocolError, ValidationError
from policyserve.registry import get_embodiment_spec
from policyserve.serving.backend import PolicyBackend
from policyserve.serving.doors.base import AddressInUseError, DoorContext, listening
from policyserve.serving.doors.gr00t import encode_outcome
from policyserve.serving.events import SchedulerListener
from policyserve.serving.request import (
    ActionResult, CallResult, Failure, FailureKind, Request, ServerBusyError, ShuttingDownError, Timing, failure_kind,
)
from policyserve.serving.scheduler import Scheduler, SchedulerConfig

from helpers import franka_observation

SPEC = get_embodiment_spec("franka_panda")


def context(**kwargs) -> DoorContext:
    fields = dict(submit=lambda request: None, listener=SchedulerListener(), modality_config=SPEC.modality_configs,
                  modality_dims=SPEC.dims, host="127.0.0.1", api_token=None, max_message_bytes=100,
                  hard_limit_bytes=400, verbose=False)
    return DoorContext(**{**fields, **kwargs})


# -- the context's shared checks -----------------------------------------------------------------------------------
def test_token_check_accepts_only_the_token_and_anything_without_one():
    assert context().authorized(None) and context().authorized("anything")
    guarded = context(api_token="s3cret")
    assert guarded.authorized("s3cret")
    assert not guarded.authorized("wrong") and not guarded.authorized(None) and not guarded.authorized(b"s3cret")


def test_size_check_names_the_field_and_both_sizes():
    context().check_size(100)
    with pytest.raises(ProtocolError, match=r"message of 101 bytes exceeds the server's max_message_bytes=100"):
        context().check_size(101)


def test_listening_turns_a_taken_port_into_address_in_use_and_other_failures_into_config_errors():
    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    try:
        with pytest.raises(AddressInUseError, match=f"port {port} on 127.0.0.1 is in use"):
            with listening(f"ws://127.0.0.1:{port}", "127.0.0.1", port):
                socket.create_server(("127.0.0.1", port))
    finally:
        taken.close()
    with pytest.raises(ConfigError, match=r"cannot listen on ws://192\.0\.2\.1:0"):
        with listening("ws://192.0.2.1:0", "192.0.2.1", 0):
            socket.create_server(("192.0.2.1", 0))  # TEST-NET address: not an address of this machine


# -- typed outcomes --------------------------------------------------------------------------------------------------
def test_failure_kinds_of_errors():
    assert failure_kind(ShuttingDownError()) is FailureKind.SHUTTING_DOWN
    assert failure_kind(ServerBusyError("server busy")) is FailureKind.BUSY
    assert failure_kind(ValidationError("state", "x", 3, 4)) is FailureKind.INVALID
    assert failure_kind(ProtocolError("bad")) is FailureKind.INVALID
    assert Failure.from_exception(KeyError("k")) == Failure(FailureKind.INTERNAL, "KeyError: 'k'")


def test_gr00t_door_encodes_each_outcome_in_its_wire_shape():
    action = {"arm": np.zeros((1, 16, 6), np.float32)}
    result = ActionResult(action, {"note": 1, "server_timing": {"replica": "r1"}}, Timing(1.0, 2.0, 3, 4.0))
    encoded_action, info = encode_outcome(result)
    assert encoded_action is action and info["note"] == 1
    assert list(info["server_timing"].items()) == [("replica", "r1"), ("queue_ms", 1.0), ("policy_ms", 2.0),
                                                   ("merged_requests", 3), ("recv_to_reply_ms", 4.0)]
    assert encode_outcome(CallResult({"reset": True})) == {"reset": True}
    assert encode_outcome(Failure(FailureKind.BUSY, "server busy: ...")) == {"error": "server busy: ..."}


def test_scheduler_answers_typed_outcomes_and_shutting_down_failures():
    policy = ConstantPolicy(SPEC.modality_configs, SPEC.dims)
    scheduler = Scheduler(PolicyBackend(policy), SchedulerConfig(max_queued_per_client=1))
    outcomes: list = []
    answered = threading.Event()

    def reply(outcome) -> None:
        outcomes.append(outcome)
        answered.set()

    scheduler.submit(Request("a", "get_action", {"observation": franka_observation(), "options": None}, reply))
    with pytest.raises(ServerBusyError, match="max_queued_per_client=1"):
        scheduler.submit(Request("a", "reset", {"options": None}, reply))
    scheduler.start()
    assert answered.wait(10)
    result = outcomes[0]
    assert isinstance(result, ActionResult) and result.action["arm"].shape == (1, 16, 6)
    assert result.timing.merged_requests == 1 and result.timing.recv_to_reply_ms >= result.timing.queue_ms
    assert scheduler.close(10)
    with pytest.raises(ShuttingDownError):
        scheduler.submit(Request("b", "reset", {"options": None}, reply))

    queued = Scheduler(PolicyBackend(policy))  # never started: close answers what is queued
    queued.submit(Request("c", "reset", {"options": None}, reply))
    assert queued.close(1)
    assert outcomes[-1] == Failure(FailureKind.SHUTTING_DOWN, "server shutting down")


# -- the composition root --------------------------------------------------------------------------------------------
def test_a_server_without_a_gr00t_door_opens_no_zeromq_socket():
    pytest.importorskip("websockets")
    from policyserve.serving.doors.openpi import OpenpiFrontDoor

    server = PolicyServer(ConstantPolicy(SPEC.modality_configs, SPEC.dims), port=None, verbose=False)
    door = OpenpiFrontDoor(port=0)
    server.add_front_door(door)
    server.start()
    try:
        assert server.doors == [door] and server.gr00t is None
        assert server.port is None and server.endpoint is None
        with pytest.raises(ConfigError, match="served by the GR00T door; this server has none"):
            server.register_endpoint("hello", lambda: "hi")
    finally:
        assert server.stop(10)


def test_the_simple_form_is_one_gr00t_door_and_keyword_settings_name_config_fields():
    server = PolicyServer(ConstantPolicy(SPEC.modality_configs, SPEC.dims), "127.0.0.1", 0, "tok", verbose=False,
                          max_batch_size=4)
    assert [type(d) for d in server.doors] == [Gr00tDoor] and server.gr00t is server.doors[0]
    assert server.config.api_token == "tok" and server.config.scheduler.max_batch_size == 4
    assert server.scheduler.config.max_batch_size == 4
    with pytest.raises(TypeError, match="unknown server setting.*max_batch"):
        PolicyServer(ConstantPolicy(SPEC.modality_configs, SPEC.dims), port=0, max_batch=4)
    with pytest.raises(ConfigError, match="max_batch_size must be >= 1, got 0"):
        PolicyServer(ConstantPolicy(SPEC.modality_configs, SPEC.dims), port=0, max_batch_size=0)
    with pytest.raises(ConfigError, match="hard_limit_bytes must be >= max_message_bytes"):
        ServerConfig(max_message_bytes=10, hard_limit_bytes=5)
    assert server.stop(5) and server.closed
