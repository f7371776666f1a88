"""Starting or joining Ray for the distributed commands, and leaving it as it was found.

``with ray_session(address=None) as ray:`` connects to the cluster at ``address`` (left running at exit), or,
with no address, starts a local Ray instance sized for this machine and shuts it down at exit, also when the
body raises (Ctrl-C's KeyboardInterrupt included). When Ray is already initialised in this process (a test or
notebook that called ``ray.init``), that session is used and left alone. Ray is imported only here and in
the modules that run on it, so commands without ``--workers`` never import it.

The local instance is reachable from this machine only and requires a token: every Ray process (GCS,
raylet, object manager, agents, workers, metrics export) listens on 127.0.0.1, and Ray's token
authentication is on with a fresh random token that only this process and the instance's own processes
hold (in their environment; nothing is written to disk). Joining a cluster that refuses this process's
token (none set, or the wrong one) fails at once with :class:`RayAuthError` naming the cause.

Leaving a local instance (:func:`leave_ray`) waits, bounded, until every one of its processes has exited
(Ray's own shutdown gives the raylet one second, then kills it, orphaning its agents), terminating the ones
that linger. A process that ran a Ray core worker can crash in Ray's C++ exit handler after ``ray.shutdown``
(its IO thread still runs while the handler destroys it); :func:`exit_process` leaves such a process
without running C-level exit handlers, as the command line does (:func:`core_worker_ran`).

:func:`absolute_paths` is what every sender of configurations to Ray workers applies: workers run in
another directory, so relative paths are made absolute on the driver.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import secrets
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import ConfigError, PolicyServeError

LOOPBACK = "127.0.0.1"
"""The address every process of the local Ray instance listens on."""
TOKEN_CHECK_S = 20.0
"""How long joining a cluster waits for its GCS to accept or refuse this process's token (Ray's own wait
for a cluster is 20 s too)."""
PATH_FIELDS = frozenset({"model_path", "dataset_path", "modality_config_path", "hdf5_path", "video_dir",
                         "output_dir"})
"""Configuration fields that :func:`absolute_paths` treats as paths on the driver's file system."""

PROCESS_EXIT_WAIT_S = 5.0
"""How long leaving a local instance waits for its processes to exit before terminating the rest (then as
long again before killing them)."""

_AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's single-machine mode, node IP = loopback
_T = TypeVar("_T")
_core_worker_ran = False


class RayUnavailableError(PolicyServeError):
    """Ray is not installed, or the Ray cluster at the given address cannot be reached."""


class RayAuthError(RayUnavailableError, ConfigError):
    """The Ray cluster refused this process's authentication token (none set, or not the cluster's): bad
    input, like any other setting that does not fit the cluster."""


def import_ray() -> Any:
    """The ``ray`` module, or :class:`RayUnavailableError` saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise RayUnavailableError(f"Ray is not installed ({exc}); install it with pip install 'policyserve[ray]'") \
            from None
    return ray


@dataclass(frozen=True)
class RayConnection:
    """What :func:`join_ray` did: ``connected`` (this call initialised Ray: shut it down when done) and
    ``local`` (it started a local instance, which goes away with the shutdown)."""

    ray: Any
    connected: bool
    local: bool


def join_ray(address: str | None = None, *, num_cpus: int | None = None, object_store_mb: int = 200) -> RayConnection:
    """Connect to the cluster at ``address``, or start a local instance (loopback only, token auth on) with
    ``num_cpus`` CPUs (default: this machine's count), an ``object_store_mb`` MB object store and worker
    processes at normal priority. Ray that is already initialised in this process is used as it is
    (``connected=False``). :class:`RayAuthError` when the cluster refuses this process's token,
    :class:`RayUnavailableError` when it cannot be reached or the instance cannot start."""
    ray = import_ray()
    if ray.is_initialized():
        return RayConnection(ray, connected=False, local=False)
    if num_cpus is not None and num_cpus < 1:
        raise ConfigError(f"num_cpus must be >= 1, got {num_cpus}")
    common = {"log_to_driver": False, "logging_level": logging.WARNING}
    # The user's token settings as they were before Ray saw them (Ray may set some while it connects).
    auth_env = {key: os.environ.get(key) for key in _AUTH_ENV}
    token_file = os.path.exists(os.path.expanduser("~/.ray/auth_token"))
    if address:
        _refresh_auth_config()
        _check_token(address, auth_env, token_file)
    global _core_worker_ran
    _core_worker_ran = True  # from here on a core worker may exist in this process (see exit_process)
    before = None if address else _descendants()
    try:
        if address:
            with _ray_env(dict(auth_env), loopback=_is_loopback(address)):
                ray.init(address=address, **common)
        else:
            # "local": a new instance even when another Ray runs on this machine (ray.init() would join it)
            # worker_niceness 0: the workers run at the priority of a single-process run (Ray's default, nice 15,
            # lets any other busy process on the machine take their cores)
            env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_AUTH_TOKEN_PATH": None}
            with _ray_env(env, loopback=True):
                ray.init(address="local", _node_ip_address=LOOPBACK, num_cpus=num_cpus or os.cpu_count() or 1,
                         object_store_memory=object_store_mb * 2**20, include_dashboard=False,
                         dashboard_host=LOOPBACK, _system_config={"worker_niceness": 0}, **common)
    except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as exc:
        _abandon(ray, before)
        if address and _caused_by_auth(exc):
            raise RayAuthError(_auth_message(address, auth_env, token_file)) from None
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise RayUnavailableError(f"could not start or reach {where}: {exc}") from None
    except BaseException:  # Ctrl-C while the instance starts: what has started stops too
        _abandon(ray, before)
        raise
    return RayConnection(ray, connected=True, local=not address)


def leave_ray(connection: RayConnection, *, wait_s: float = PROCESS_EXIT_WAIT_S) -> None:
    """Undo :func:`join_ray`: shut Ray down if that call initialised it; for a local instance, also wait up to
    ``wait_s`` for all of its processes (GCS, raylet, agents, workers) to exit, then terminate the ones left,
    and kill those still there ``wait_s`` later. Returns once they are gone (or cannot be signalled)."""
    if not connection.connected:
        return
    _shutdown(connection.ray, _instance_processes(connection.ray) if connection.local else [], wait_s)


def _abandon(ray: Any, before: dict[tuple[int, float], Any] | None) -> None:
    """Shut down a ``ray.init`` that failed or was interrupted; for a local instance (``before``: this process's
    descendants before it started), also stop every process it started, recorded by Ray or not yet."""
    if before is None:
        ray.shutdown()
        return
    recorded = _instance_processes(ray)  # none when ray.init stopped before it recorded its node
    new = [p for key, p in _descendants().items() if key not in before]
    found = {p.pid: p for p in (*recorded, *new)}
    # what Ray has not recorded, its shutdown does not stop: terminated at once
    _shutdown(ray, list(found.values()), PROCESS_EXIT_WAIT_S, first_wait_s=PROCESS_EXIT_WAIT_S if recorded else 0.0)


def _shutdown(ray: Any, processes: list[Any], wait_s: float, first_wait_s: float | None = None) -> None:
    """``ray.shutdown()``, then wait up to ``first_wait_s`` (default ``wait_s``) for ``processes`` to exit;
    the ones left, and the children they have started meanwhile, are terminated, then killed ``wait_s``
    later."""
    ray.shutdown()
    left = _wait_gone(processes, wait_s if first_wait_s is None else first_wait_s)
    for stop in ("terminate", "kill"):
        left = _with_children(left)  # a raylet still starting its agents and workers: signalled together
        for process in left:
            try:
                getattr(process, stop)()
            except Exception:  # noqa: BLE001 - gone meanwhile, or not ours to signal
                pass
        left = _wait_gone(left, wait_s)


def core_worker_ran() -> bool:
    """Whether :func:`join_ray` started or joined Ray in this process (a Ray core worker may have run here)."""
    return _core_worker_ran


def exit_process(code: int) -> None:
    """End this process with ``code`` after Python's exit handlers and a flush of stdout/stderr, without the
    C-level exit handlers: Ray's core worker registers one that may destroy the worker while its IO thread
    still runs, a segfault (exit -11) after a clean ``ray.shutdown`` (seen after Ctrl-C)."""
    import atexit

    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed or broken stream: nothing more to say
                pass
        os._exit(code)


@contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None,
                object_store_mb: int = 200) -> Iterator[Any]:
    """:func:`join_ray` for the body of a ``with``; yields the ``ray`` module and shuts down what it started
    (see module docstring)."""
    connection = join_ray(address, num_cpus=num_cpus, object_store_mb=object_store_mb)
    try:
        yield connection.ray
    finally:
        leave_ray(connection)


def absolute_paths(config: _T, *, cwd: str | None = None) -> _T:
    """``config`` (a dataclass, nested ones included) with every relative path in a :data:`PATH_FIELDS` field
    that exists under ``cwd`` (default: this process's working directory) made absolute, for Ray workers that
    run in another directory. Other values (absolute paths, hub ids, paths that exist only on the nodes) and
    non-dataclass values are returned as they are."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        return config
    base = cwd or os.getcwd()
    changes: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        if not field.init:
            continue
        value = getattr(config, field.name)
        if field.name in PATH_FIELDS and isinstance(value, (str, os.PathLike)) and str(value):
            path = os.path.expanduser(os.fspath(value))
            if not os.path.isabs(path) and os.path.exists(os.path.join(base, path)):
                changes[field.name] = type(value)(os.path.normpath(os.path.join(base, path))) \
                    if isinstance(value, str) else os.path.normpath(os.path.join(base, path))
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            new = absolute_paths(value, cwd=base)
            if new is not value:
                changes[field.name] = new
    return dataclasses.replace(config, **changes) if changes else config


def loopback_serve_replica() -> None:
    """Called in each Serve replica as it starts: on a node whose IP is 127.0.0.1 (the local instance), the
    replica's inter-deployment gRPC server listens on 127.0.0.1 too (Ray Serve 2.60 binds it to every
    interface, ``[::]:0``, whatever the node's IP). Elsewhere, and on a Ray without that server, it does
    nothing."""
    import ray

    try:
        from ray.serve._private import replica
    except ImportError:
        return
    add = getattr(replica, "add_port_to_grpc_server", None)
    if add is None or getattr(add, "loopback", False) or ray.util.get_node_ip_address() != LOOPBACK:
        return

    def add_on_loopback(server: Any, address: str) -> Any:
        if address.startswith("[::]:"):
            address = f"{LOOPBACK}:{address.rsplit(':', 1)[1]}"
        return add(server, address)

    add_on_loopback.loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = add_on_loopback


# -- internals ---------------------------------------------------------------------------------------------
def _instance_processes(ray: Any) -> list[Any]:
    """The processes of the local instance this process started (psutil handles, safe against pid reuse): the
    ones ``ray.init`` spawned and all of their descendants; empty when Ray or psutil does not tell."""
    try:
        import psutil  # after ray: Ray ships the psutil it uses

        node = ray._private.worker._global_node
        roots = [info.process.pid for infos in node.all_processes.values() for info in infos]
    except (ImportError, AttributeError):
        return []
    found: dict[int, Any] = {}
    for pid in roots:
        try:
            root = psutil.Process(pid)
            for process in (root, *root.children(recursive=True)):
                found.setdefault(process.pid, process)
        except psutil.Error:
            continue
    return list(found.values())


def _descendants() -> dict[tuple[int, float], Any]:
    """This process's descendants, keyed by (pid, start time); empty without psutil."""
    try:
        import psutil  # after ray: Ray ships the psutil it uses
    except ImportError:
        return {}
    found = {}
    try:
        for process in psutil.Process().children(recursive=True):
            try:
                found[(process.pid, process.create_time())] = process
            except psutil.Error:
                continue
    except psutil.Error:
        pass
    return found


def _with_children(processes: list[Any]) -> list[Any]:
    """``processes`` and all of their running descendants (once each)."""
    found: dict[int, Any] = {}
    for process in processes:
        found.setdefault(process.pid, process)
        try:
            for child in process.children(recursive=True):
                found.setdefault(child.pid, child)
        except Exception:  # noqa: BLE001 - psutil.Error: gone meanwhile
            continue
    return list(found.values())


def _wait_gone(processes: list[Any], timeout: float) -> list[Any]:
    """Wait up to ``timeout`` s for ``processes`` to exit (a zombie has); the ones still running."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in processes if _running(p)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)


def _running(process: Any) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]") if ":" in address else address
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextmanager
def _ray_env(env: dict[str, str | None], *, loopback: bool) -> Iterator[None]:
    """``env`` (None: unset) in this process's environment while Ray starts, so the processes it spawns
    inherit it; with ``loopback``, Ray's single-machine mode (node IP 127.0.0.1: every server binds
    loopback). This process's Ray configuration and token are read from it and kept until the next
    :func:`join_ray`; the environment is restored on exit."""
    from ray._private import ray_constants

    if loopback:
        env = {**env, _LOOPBACK_ENV: "0"}
    saved = {key: os.environ.get(key) for key in env}
    saved_cluster = ray_constants.ENABLE_RAY_CLUSTER
    try:
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if loopback:  # read at import time; this process may have imported ray already
            ray_constants.ENABLE_RAY_CLUSTER = False
        _refresh_auth_config()
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_cluster
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _refresh_auth_config() -> None:
    """Make Ray's cached configuration and token in this process match the environment (an earlier local
    instance left its own); only called while Ray is not initialised."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # a Ray without token authentication
        return
    Config.initialize("")  # before dropping the token: the loader must not reload in a stale mode
    AuthenticationTokenLoader.instance().reset_cache()


def _check_token(address: str, auth_env: dict[str, str | None], token_file: bool) -> None:
    """:class:`RayAuthError` when the GCS at ``address`` refuses this process's token,
    :class:`RayUnavailableError` when it does not answer within :data:`TOKEN_CHECK_S`; returns when it
    accepts the token, or fails otherwise (Ray's own connection attempt then reports it)."""
    if "://" in address or address == "auto" or ":" not in address:
        return
    try:
        from ray._raylet import GcsClient
        from ray.exceptions import AuthenticationError
    except ImportError:
        return
    outcome: dict[str, BaseException] = {}

    def probe() -> None:
        try:
            GcsClient(address=address)
        except BaseException as exc:  # noqa: BLE001 - reported through outcome
            outcome["error"] = exc

    thread = threading.Thread(target=probe, name="ray-token-check", daemon=True)
    thread.start()
    thread.join(TOKEN_CHECK_S)
    if thread.is_alive():  # Ray's client keeps trying in the background for a while, then gives up
        raise RayUnavailableError(f"could not reach the Ray cluster at {address}: its GCS did not answer within "
                                  f"{TOKEN_CHECK_S:g} s")
    if isinstance(outcome.get("error"), AuthenticationError):
        raise RayAuthError(_auth_message(address, auth_env, token_file))


def _caused_by_auth(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if type(current).__name__ == "AuthenticationError" or "InvalidAuthToken" in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def _auth_message(address: str, auth_env: dict[str, str | None], token_file: bool) -> str:
    """Why the cluster refused, from the token settings this process had (``auth_env``, and whether
    ``~/.ray/auth_token`` existed) before connecting."""
    token_mode = (auth_env.get("RAY_AUTH_MODE") or "").lower() == "token"
    if token_mode and not (auth_env.get("RAY_AUTH_TOKEN") or auth_env.get("RAY_AUTH_TOKEN_PATH") or token_file):
        return (f"the Ray cluster at {address} requires a token (InvalidAuthToken) and RAY_AUTH_MODE=token is set "
                "but no token is: put the cluster's token in RAY_AUTH_TOKEN or the token file "
                "(RAY_AUTH_TOKEN_PATH, default ~/.ray/auth_token)")
    if token_mode:
        return (f"the Ray cluster at {address} refused this process's token (InvalidAuthToken): RAY_AUTH_TOKEN, "
                "or the token file (RAY_AUTH_TOKEN_PATH, default ~/.ray/auth_token), must hold the cluster's token")
    return (f"the Ray cluster at {address} requires a token (InvalidAuthToken): set RAY_AUTH_MODE=token and the "
            "cluster's token in RAY_AUTH_TOKEN or the token file (RAY_AUTH_TOKEN_PATH, default ~/.ray/auth_token)")


__all__ = ["LOOPBACK", "PATH_FIELDS", "PROCESS_EXIT_WAIT_S", "RayAuthError", "RayConnection", "RayUnavailableError",
           "absolute_paths", "core_worker_ran", "exit_process", "import_ray", "join_ray", "leave_ray",
           "loopback_serve_replica", "ray_session"]
