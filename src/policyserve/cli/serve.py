"""``policyserve serve``: a policy server with GR00T's ``run_gr00t_server.py`` flags.

The flags become a :class:`~policyserve.serving.server.ServerConfig` (host, token, limits, batching) and
the list of front doors: GR00T's ZeroMQ protocol on ``--port`` and, with ``--openpi-port``, openpi's
websocket protocol too; ``--protocol openpi`` opens the openpi door only (on ``--openpi-port``, else
``--port``). ``--metrics-port`` adds a Prometheus endpoint.

Policy source, first match wins: ``--model-path`` (a trained checkpoint), ``--dataset-path`` (replay
a LeRobot dataset), ``--policy scripted:<task>`` (the simulation's scripted expert), otherwise the
built-in constant policy for the modality config (so a server always starts).
"""

from __future__ import annotations

import argparse
import signal
from typing import Any

from ..serving.spec import DEFAULT_EMBODIMENT
from .common import add_api_token, add_server_address, embodiment_hint
from .flags import Flag, RawDescriptionHelpFormatter, add_config_flags, config_kwargs, field_flags

MiB = 1 << 20


def register(sub: Any) -> None:
    """Add the ``serve`` command; its flags come from PolicySpec, ServerConfig and SchedulerConfig."""
    from ..serving.scheduler import SchedulerConfig
    from ..serving.server import ServerConfig
    from ..serving.ray_config import RayConfig
    from ..serving.spec import PolicySpec

    p = sub.add_parser("serve", help="serve a policy (model, replay, scripted, constant) to GR00T and openpi clients",
                       description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    add_server_address(p)
    add_api_token(p)
    spec = add_config_flags(
        p, PolicySpec, ["strict", "embodiment_tag", "modality_config_path", "model_path", "device", "dataset_path",
                        "execution_horizon", "action_horizon", "policy", "sim_wrapper"],
        strict=Flag(help="validate observations and actions"),
        embodiment_tag=Flag(help="embodiment tag name or value (GR1, NEW_EMBODIMENT, franka_panda, ...)"),
        modality_config_path=Flag(help="JSON file of modality configs"),
        model_path=Flag(help="checkpoint directory (model mode)"),
        device=Flag(help="torch device for model mode (cpu, cuda, cuda:0)"),
        dataset_path=Flag(help="LeRobot dataset to replay (replay mode)"),
        execution_horizon=Flag(help="replay: steps the cursor advances per get_action (default: the action horizon)"),
        action_horizon=Flag(help="replay: action chunk length when the config is inferred from the dataset"),
        policy=Flag(help="built-in policy: 'scripted:lift', 'scripted:stack', 'constant'"),
        sim_wrapper=Flag(name="use-sim-policy-wrapper"),
    )
    server = add_config_flags(p, ServerConfig, ["max_message_bytes", "curve_secret_key", "curve_authorized_keys",
                                                "tls_cert", "tls_key", "max_connections", "max_pending_connections",
                                                "open_timeout", "idle_timeout", "max_unsent_bytes", "metrics_token"],
                              max_message_bytes=Flag(name="max-message-mb", scale=MiB, metavar="MiB"),
                              max_unsent_bytes=Flag(name="max-unsent-mb", scale=MiB, metavar="MiB"))
    scheduler = add_config_flags(
        p, SchedulerConfig, ["max_batch_size", "batch_window_ms", "rejoin_wait_ms", "max_queued_per_client",
                             "max_queued_bytes", "max_request_batch"],
        max_queued_bytes=Flag(name="max-queued-mb", scale=MiB, metavar="MiB"))
    field_flags(p).update(host="--host", api_token="--api-token")
    p.add_argument("--protocol", choices=("gr00t", "openpi"), default="gr00t",
                   help="gr00t (default): GR00T clients on --port, openpi clients too with --openpi-port; "
                        "openpi: openpi clients only, on --openpi-port or else --port")
    p.add_argument("--openpi-port", type=int, default=None, help="also serve openpi websocket clients on this port")
    p.add_argument("--openpi-key-map", default=None,
                   help="JSON file mapping openpi keys to the policy's (default: observation/image, "
                        "observation/wrist_image, observation/state, prompt -> actions)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics on http://HOST:PORT/metrics (default: no metrics server)")
    group = p.add_argument_group("policy replicas on Ray (needs the 'ray' extra)")
    given = "only with --replicas or --autoscale"
    ray = add_config_flags(
        group, RayConfig, ["replicas", "ray_address", "replica_cpus", "replica_gpus", "autoscale"], owner=p,
        replicas=Flag(default=None, help="+Default: the policy runs in this process and Ray is not used."),
        ray_address=Flag(metavar="ADDR"),
        replica_cpus=Flag(default=None, help=f"+(default {RayConfig.replica_cpus:g}; {given})"),
        replica_gpus=Flag(default=None, help=f"+(default {RayConfig.replica_gpus:g}; {given})"),
        autoscale=Flag(parse=str, metavar="MIN:MAX"),
    )
    p.set_defaults(func=lambda args: run(args, spec, server, scheduler, ray), error_hint=embodiment_hint)


def front_doors(args: argparse.Namespace) -> list:
    """The front doors the flags ask for: GR00T (unless ``--protocol openpi``), openpi, metrics."""
    from ..errors import ConfigError

    doors: list = []
    if args.protocol != "openpi":
        from ..serving.doors.gr00t import Gr00tDoor

        doors.append(Gr00tDoor(args.port))
    if args.protocol == "openpi" or args.openpi_port is not None:
        if args.use_sim_policy_wrapper:
            raise ConfigError("--use-sim-policy-wrapper is for GR00T sim clients; the openpi door needs the plain "
                              "policy (drop one of them)")
        from ..wire.openpi_keys import OpenpiKeyMap
        from ..serving.doors.openpi import OpenpiFrontDoor

        key_map = OpenpiKeyMap.from_file(args.openpi_key_map) if args.openpi_key_map else None
        doors.append(OpenpiFrontDoor(args.port if args.openpi_port is None else args.openpi_port, key_map=key_map))
    elif args.openpi_key_map:
        raise ConfigError("--openpi-key-map needs --openpi-port or --protocol openpi")
    if args.metrics_port is not None:
        from ..serving.doors.metrics import MetricsExporter

        doors.append(MetricsExporter(args.metrics_port))
    return doors


def policy_spec(args: argparse.Namespace, dests: dict[str, str]) -> Any:
    """The :class:`PolicySpec` the flags describe."""
    from ..serving.spec import PolicySpec

    return PolicySpec(**config_kwargs(args, dests))


def _ray_backend(args: argparse.Namespace, spec: Any, dests: dict[str, str]) -> Any:
    """Policy replicas on Ray (``--replicas``/``--autoscale``), else None; Ray is imported only here."""
    from ..errors import ConfigError
    from ..serving.ray_config import RayConfig, parse_autoscale

    values = config_kwargs(args, dests)
    if values["replicas"] is None and values["autoscale"] is None:
        given = [args.field_flags[name] for name in ("ray_address", "replica_cpus", "replica_gpus")
                 if values[name] is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} needs --replicas N (or --autoscale MIN:MAX)")
        return None
    if values["autoscale"] is not None:
        values["autoscale"] = parse_autoscale(values["autoscale"])
        if values["replicas"] is None:
            values["replicas"] = values["autoscale"][0]
    config = RayConfig(**{name: value for name, value in values.items() if value is not None})
    try:
        from ..serving.ray_backend import RayBackend
    except ImportError as exc:
        raise ConfigError(f"--replicas needs Ray ({exc}): pip install 'policyserve[ray]'") from None
    print(f"  Starting policy replicas on Ray{' at ' + args.ray_address if args.ray_address else ''}...", flush=True)
    from ..cluster.runtime import absolute_paths

    return RayBackend(absolute_paths(spec).build, config, stateful=spec.stateful)  # replicas run elsewhere


def _describe(args: argparse.Namespace) -> list[str]:
    from ..types import EmbodimentTag

    if args.embodiment_tag:
        try:
            tag = str(EmbodimentTag.resolve(args.embodiment_tag))
        except ValueError:
            tag = args.embodiment_tag
    elif args.modality_config_path:
        tag = f"(modality config from {args.modality_config_path})"
    elif args.model_path:
        tag = "(from the checkpoint)"
    elif args.dataset_path:
        tag = "(modality config inferred from the dataset)"
    else:
        tag = DEFAULT_EMBODIMENT
    mode = ("model" if args.model_path else "replay" if args.dataset_path
            else args.policy or "constant (built-in default)")
    lines = [f"  Embodiment tag: {tag}", f"  Mode: {mode}"]
    if args.model_path:
        lines += [f"  Model path: {args.model_path}", f"  Device: {args.device}"]
    if args.dataset_path:
        horizon = args.execution_horizon or "the action horizon"
        lines += [f"  Dataset path: {args.dataset_path}", f"  Execution horizon: {horizon}"]
    ports = [] if args.protocol == "openpi" else [f"  Port: {args.port}"]
    if args.protocol == "openpi" or args.openpi_port is not None:
        ports.append(f"  openpi port: {args.port if args.openpi_port is None else args.openpi_port}")
    lines += [f"  Host: {args.host}", *ports, f"  Strict: {args.strict}",
              f"  Auth: {'api token required' if args.api_token else 'none'}"
              f"{'; CurveZMQ encryption on the GR00T port' if getattr(args, 'curve_secret_key', None) else ''}"]
    return lines


def server_config(args: argparse.Namespace, server: dict[str, str], scheduler: dict[str, str]) -> Any:
    """The :class:`~policyserve.serving.server.ServerConfig` the flags describe."""
    from ..serving.scheduler import SchedulerConfig
    from ..serving.server import ServerConfig

    return ServerConfig(host=args.host, api_token=args.api_token, **config_kwargs(args, server),
                        scheduler=SchedulerConfig(**config_kwargs(args, scheduler)))


def run(args: argparse.Namespace, spec_dests: dict[str, str], server_dests: dict[str, str],
        scheduler_dests: dict[str, str], ray_dests: dict[str, str]) -> int:
    """Start the server the flags describe and serve until SIGTERM/SIGINT or a ``kill`` request."""
    from ..serving.server import PolicyServer

    print("Starting policyserve inference server...", flush=True)
    for line in _describe(args):
        print(line, flush=True)
    backend = None
    try:
        spec = policy_spec(args, spec_dests)
        config = server_config(args, server_dests, scheduler_dests)
        doors = front_doors(args)
        backend = _ray_backend(args, spec, ray_dests)
        if backend is not None:
            for line in backend.describe():
                print(line, flush=True)
        policy = None if backend else spec.build()
        for line in policy.describe() if hasattr(policy, "describe") else []:  # a replay: where its keys come from
            print(line, flush=True)
        server = PolicyServer(policy, backend=backend, port=None, config=config)
        for door in doors:
            server.add_front_door(door)
        server.bind()
    except BaseException:
        if backend is not None:
            backend.close()
        raise
    batching = ("off" if args.max_batch_size == 1 or not server.backend.batchable
                else f"up to {args.max_batch_size} requests per call")
    print(f"  Batching: {batching}", flush=True)

    def _shutdown(signum: int, _frame: object) -> None:
        server.stop(timeout=0)

    signal.signal(signal.SIGTERM, _shutdown)
    signal.signal(signal.SIGINT, _shutdown)
    server.run()
    return 0
