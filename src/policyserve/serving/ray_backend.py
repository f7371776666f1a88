"""A backend that hands the scheduler's merged batches to N policy replicas on a Ray cluster.

The replicas are a Ray Serve deployment (:class:`~policyserve.serving.ray_replica.PolicyReplica`) with
Serve's HTTP proxy off: Serve places them on any node with the requested CPUs/GPUs, health-checks and
restarts them, optionally autoscales them, and routes each call to the less loaded of two replicas
(power of two choices; with ``max_ongoing_requests=1`` a call only goes to an idle replica). The
scheduler keeps one merged batch in flight per replica (``concurrency``).

A replica that dies during a call: the call is retried once (Serve routes it to a live replica). No
replica running for ``no_replica_timeout_s``: the call is answered with "no policy replica available".

Importing this module imports Ray; nothing else in policyserve does (:class:`RayConfig` lives in the
Ray-free :mod:`~policyserve.serving.ray_config`).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError

from ..errors import ConfigError, PolicyServeError
from ..cluster.runtime import RayConnection, RayUnavailableError, join_ray, leave_ray
from ..policies.base import BasePolicy
from ..types import ModalityConfigs
from .backend import Backend, BatchResult, to_action_request
from .ray_config import RayConfig, parse_autoscale
from .ray_replica import PolicyReplica
from .request import Request

__all__ = ["NoReplicaError", "RayBackend", "RayConfig", "ReplicaStartError", "parse_autoscale"]

DEPLOYMENT = "PolicyReplica"
_POLL_S = 1.0  # how often a waiting call checks that a replica is still running
_REPLICA_DIED = (RayActorError, ActorUnavailableError)


class NoReplicaError(PolicyServeError):
    """No policy replica could answer (none running, or the retry after a replica died failed too)."""


class ReplicaStartError(ConfigError):
    """The replicas could not be started (bad policy description, resources the cluster lacks, ...)."""


class RayBackend(Backend):
    """Policy replicas on Ray Serve; ``build`` (picklable, no arguments) makes the policy in each replica.

    ``stateful=True`` (per-client state, e.g. replay) runs exactly one replica whatever the config says;
    :attr:`notes` says so. Blocks until the replicas are running (or raises :class:`ReplicaStartError`).
    """

    def __init__(self, build: Callable[[], BasePolicy], config: RayConfig | None = None, *,
                 stateful: bool = False, verbose: bool = True) -> None:
        config = config or RayConfig()
        self.notes: list[str] = []
        if stateful and config.max_replicas > 1:
            self.notes.append(f"stateful policy (per-client state): runs as one replica, not {config.max_replicas}")
            config = RayConfig(**{**config.__dict__, "replicas": 1, "autoscale": None})
        self.config = config
        self.verbose = verbose
        self.app_name = config.app_name or f"policyserve-{uuid.uuid4().hex[:8]}"
        self.concurrency = config.max_replicas
        self._started_ray = False
        self._connected = False
        self._connection: RayConnection | None = None
        self._deployed = False
        self._closed = False
        self._lock = threading.Lock()
        try:
            self._connect()
            self._handle = self._deploy(build)
            info = self._call("describe")
        except BaseException:
            self.close()
            raise
        self._modality_config: ModalityConfigs = info["modality_config"]
        self.batchable = info["batchable"]
        self.row_options = info["row_options"]
        self.capabilities = info.get("capabilities", frozenset())

    # -- Backend ---------------------------------------------------------------------------------
    def get_modality_config(self) -> ModalityConfigs:
        return self._modality_config

    def run_batch(self, requests: Sequence[Request]) -> list[BatchResult]:
        return self._call("run_batch", [to_action_request(r) for r in requests], what="get_action")

    def reset(self, options: dict | None, client: str) -> Any:
        result = self._call("reset", options, client)
        if isinstance(result, BaseException):
            raise result
        return result

    def close(self) -> None:
        """Remove the Serve application; a local Ray instance this backend started is shut down, a
        cluster given by ``ray_address`` keeps running."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        # The scheduler has answered every call before this, so a local instance is simply stopped: a
        # graceful Serve shutdown adds nothing and would wait for a GCS already killed with our process group.
        if self._deployed and not self._started_ray:
            _bounded(lambda: serve.delete(self.app_name), 60, f"removing Serve application {self.app_name}")
        if self._connection is not None:
            connection, self._connection = self._connection, None
            _bounded(lambda: leave_ray(connection), 60, "Ray shutdown")

    # -- description -----------------------------------------------------------------------------
    def describe(self) -> list[str]:
        """Banner lines: where the replicas run and how many."""
        cfg = self.config
        where = (f"Ray cluster at {cfg.ray_address}" if cfg.ray_address
                 else "local Ray instance" if self._started_ray else "the connected Ray cluster")
        count = (f"autoscaled {cfg.autoscale[0]}..{cfg.autoscale[1]}" if cfg.autoscale else str(cfg.replicas))
        return [f"  Replicas: {count} on {where} (Ray Serve application {self.app_name!r}, "
                f"{cfg.replica_cpus:g} CPU / {cfg.replica_gpus:g} GPU each)", *(f"  Note: {n}" for n in self.notes)]

    def replica_states(self) -> dict[str, int]:
        """Replica state -> count, as Serve reports it (``{"RUNNING": 2}``); empty without the app."""
        app = serve.status().applications.get(self.app_name)
        deployment = app.deployments.get(DEPLOYMENT) if app else None
        return dict(deployment.replica_states) if deployment else {}

    # -- setup -----------------------------------------------------------------------------------
    def _connect(self) -> None:
        cfg = self.config
        try:
            connection = join_ray(cfg.ray_address, object_store_mb=cfg.local_object_store_mb,
                                  num_cpus=max(os.cpu_count() or 1, math.ceil(cfg.max_replicas * cfg.replica_cpus)))
        except RayUnavailableError as exc:
            raise ReplicaStartError(str(exc)) from None
        self._connection = connection
        self._connected, self._started_ray = connection.connected, connection.local
        logging.getLogger("ray.serve").setLevel(logging.WARNING)

    def _deploy(self, build: Callable[[], BasePolicy]) -> Any:
        cfg = self.config
        if self._started_ray:  # one node that will never grow: refuse what it cannot place at once
            have = ray.cluster_resources()
            for name, need in (("CPU", cfg.replica_cpus), ("GPU", cfg.replica_gpus)):
                if need > have.get(name, 0):
                    raise ReplicaStartError(f"each replica needs {need:g} {name}s (replica_{name.lower()}s) but "
                                            f"the local Ray instance has {have.get(name, 0):g}")
        serve.start(proxy_location="Disabled")
        options: dict[str, Any] = {
            "name": DEPLOYMENT, "max_ongoing_requests": 1, "max_constructor_retry_count": 3,
            "ray_actor_options": {"num_cpus": cfg.replica_cpus, "num_gpus": cfg.replica_gpus},
            "health_check_period_s": 5.0, "health_check_timeout_s": 30.0,
            "graceful_shutdown_wait_loop_s": 0.5, "graceful_shutdown_timeout_s": cfg.graceful_shutdown_s,
        }
        if cfg.autoscale:
            options["autoscaling_config"] = {
                "min_replicas": cfg.autoscale[0], "max_replicas": cfg.autoscale[1], "initial_replicas": cfg.replicas,
                "target_ongoing_requests": 1, "upscale_delay_s": 5.0, "downscale_delay_s": 60.0,
            }
        else:
            options["num_replicas"] = cfg.replicas
        app = serve.deployment(PolicyReplica, **options).bind(build)
        handle = serve.run_many([serve.RunTarget(app, name=self.app_name, route_prefix=None)],
                                wait_for_applications_running=False)[0]
        self._deployed = True
        self._wait_until_running()
        return handle

    def _wait_until_running(self) -> None:
        deadline = time.monotonic() + self.config.start_timeout_s
        while True:
            app = serve.status().applications.get(self.app_name)
            status = str(app.status.value) if app else "NOT_STARTED"
            if status == "RUNNING":
                return
            message = _app_message(app)
            if status in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise ReplicaStartError(f"policy replicas failed to start: {message}")
            if time.monotonic() > deadline:
                raise ReplicaStartError(
                    f"policy replicas not running after {self.config.start_timeout_s:g} s (status {status}): {message}")
            time.sleep(0.2)

    # -- calls -----------------------------------------------------------------------------------
    def _call(self, method: str, *args: Any, what: str | None = None) -> Any:
        """``method(*args)`` on some replica; a replica dying during the call is retried once. Messages name
        the call as ``what`` (default ``method``), e.g. the client's endpoint."""
        what = what or method
        try:
            return self._wait(getattr(self._handle, method).remote(*args), what)
        except _REPLICA_DIED as exc:
            if self.verbose:
                print(f"Policy replica died during {what} ({_first_line(exc)}); retrying once on another "
                      "replica", flush=True)
        try:
            return self._wait(getattr(self._handle, method).remote(*args), what)
        except _REPLICA_DIED as exc:
            raise NoReplicaError(f"no policy replica available: the replica answering {what} died and the "
                                 f"retry on another replica failed too ({_first_line(exc)})") from None

    def _wait(self, response: Any, method: str) -> Any:
        """The response's result; bounded by ``call_timeout_s`` and by no replica running for
        ``no_replica_timeout_s``."""
        cfg = self.config
        start = time.monotonic()
        none_since: float | None = None
        while True:
            try:
                return response.result(timeout_s=_POLL_S)
            except TimeoutError:
                pass
            now = time.monotonic()
            if now - start > cfg.call_timeout_s:
                response.cancel()
                raise NoReplicaError(f"policy replica did not answer {method} within {cfg.call_timeout_s:g} s")
            states = self._states_or_empty()
            if states.get("RUNNING"):
                none_since = None
                continue
            none_since = none_since or now
            if now - none_since > cfg.no_replica_timeout_s:
                response.cancel()
                raise NoReplicaError(
                    f"no policy replica available: none of the {cfg.max_replicas} replicas has been running for "
                    f"{cfg.no_replica_timeout_s:g} s (replica states: {states or 'none'}); "
                    "check the cluster's nodes and resources (ray status)")

    def _states_or_empty(self) -> dict[str, int]:
        try:
            return self.replica_states()
        except Exception:  # noqa: BLE001 - Serve controller unreachable: counts as no replica
            return {}


def _app_message(app: Any) -> str:
    """Serve's status messages on one line; a replica's traceback shortened to its summary and error."""
    if app is None:
        return "application not found"
    messages = [d.message for d in app.deployments.values() if d.message] or [app.message]
    parts = []
    for message in filter(None, messages):
        lines = [line.strip() for line in message.splitlines() if line.strip()]
        parts.append(lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}")
    return "; ".join(parts) or f"replica states {[dict(d.replica_states) for d in app.deployments.values()]}"


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    name = next((line for line in lines if line.startswith("name:")), "")
    return f"{type(exc).__name__}: {lines[0] if lines else ''}" + (f" [{name}]" if name else "")


def _bounded(call: Callable[[], Any], timeout: float, what: str) -> None:
    """Run ``call`` on a thread; give up (with a message) after ``timeout`` s."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=run, name=f"policyserve-{what}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        print(f"{what} did not finish within {timeout:g} s; continuing", flush=True)
    elif errors:
        print(f"{what} failed: {errors[0]}", flush=True)
