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
import sys
from typing import Any

from ..serving.spec import DEFAULT_EMBODIMENT
from .common import add_api_token, add_server_address


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve a policy (model, replay, scripted, constant) to GR00T and openpi clients",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_address(p)
    p.add_argument("--strict", action=argparse.BooleanOptionalAction, default=True,
                   help="validate observations and actions (default on)")
    p.add_argument("--embodiment-tag", default=None,
                   help="embodiment tag name or value (GR1, NEW_EMBODIMENT, franka_panda, ...)")
    p.add_argument("--modality-config-path", default=None, help="JSON file of modality configs")
    add_api_token(p)
    p.add_argument("--model-path", default=None, help="checkpoint directory (model mode)")
    p.add_argument("--device", default="cpu", help="torch device for model mode (cpu, cuda, cuda:0)")
    p.add_argument("--dataset-path", default=None, help="LeRobot dataset to replay (replay mode)")
    p.add_argument("--execution-horizon", type=int, default=None,
                   help="replay: steps the cursor advances per get_action (default: the action horizon)")
    p.add_argument("--action-horizon", type=int, default=16,
                   help="replay: action chunk length when the config is inferred from the dataset (default 16)")
    p.add_argument("--policy", default=None, help="built-in policy: 'scripted:lift', 'scripted:stack', 'constant'")
    p.add_argument("--use-sim-policy-wrapper", action=argparse.BooleanOptionalAction, default=False,
                   help="accept flat video.<k>/state.<k> observations and answer action.<k> (GR00T sim envs)")
    p.add_argument("--max-message-mb", type=float, default=256, help="largest request accepted (MiB)")
    p.add_argument("--max-batch-size", type=int, default=32,
                   help="most get_action requests merged into one policy call (continuous batching; "
                        "1 turns merging off; default 32)")
    p.add_argument("--batch-window-ms", type=float, default=0.0,
                   help="extra wait for more requests before a policy call that is not full (default 0)")
    p.add_argument("--rejoin-wait-ms", type=float, default=5.0,
                   help="after a merged call, wait up to this long (at most half the call's time) for the clients "
                        "it answered to send again, so they stay in one batch; never for a lone client (default 5)")
    p.add_argument("--max-queued-per-client", type=int, default=64,
                   help="requests one client may have waiting; more get 'server busy' at once (default 64)")
    p.add_argument("--max-queued-mb", type=float, default=1024,
                   help="total size of waiting requests; more get 'server busy' at once (MiB, default 1024)")
    p.add_argument("--protocol", choices=("gr00t", "openpi"), default="gr00t",
                   help="gr00t (default): GR00T clients on --port, openpi clients too with --openpi-port; "
                        "openpi: openpi clients only, on --openpi-port or else --port")
    p.add_argument("--openpi-port", type=int, default=None, help="also serve openpi websocket clients on this port")
    p.add_argument("--openpi-key-map", default=None,
                   help="JSON file mapping openpi keys to the policy's (default: observation/image, "
                        "observation/wrist_image, observation/state, prompt -> actions)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics on http://HOST:PORT/metrics (default: no metrics server)")
    ray = p.add_argument_group("policy replicas on Ray (needs the 'ray' extra)")
    ray.add_argument("--replicas", type=int, default=None,
                     help="serve through N policy replicas on Ray Serve, each loading the policy itself (default: "
                          "the policy runs in this process and Ray is not used)")
    ray.add_argument("--ray-address", default=None,
                     help="Ray cluster to place replicas on (e.g. 10.0.0.5:6379); default: start a local Ray instance")
    ray.add_argument("--replica-cpus", type=float, default=None, help="CPUs reserved per replica (default 1)")
    ray.add_argument("--replica-gpus", type=float, default=None,
                     help="GPUs reserved per replica (default 0; use with --device cuda)")
    ray.add_argument("--autoscale", default=None, metavar="MIN:MAX",
                     help="let Ray Serve scale the replicas between MIN and MAX with the load")
    p.set_defaults(func=run)


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


def policy_spec(args: argparse.Namespace):
    """The :class:`PolicySpec` the flags describe."""
    from ..serving.spec import PolicySpec

    return PolicySpec(
        model_path=args.model_path, device=args.device, dataset_path=args.dataset_path,
        execution_horizon=args.execution_horizon, action_horizon=args.action_horizon, policy=args.policy,
        embodiment_tag=args.embodiment_tag, modality_config_path=args.modality_config_path, strict=args.strict,
        sim_wrapper=args.use_sim_policy_wrapper,
    )


def _ray_backend(args: argparse.Namespace, spec):
    """Policy replicas on Ray (``--replicas``/``--autoscale``), else None; Ray is imported only here."""
    ray_flags = {"--ray-address": args.ray_address, "--replica-cpus": args.replica_cpus,
                 "--replica-gpus": args.replica_gpus}
    if args.replicas is None and args.autoscale is None:
        given = [flag for flag, value in ray_flags.items() if value is not None]
        if given:
            from ..errors import ConfigError

            raise ConfigError(f"{', '.join(given)} needs --replicas N (or --autoscale MIN:MAX)")
        return None
    try:
        from ..serving.ray_backend import RayBackend, RayConfig, parse_autoscale
    except ImportError as exc:
        from ..errors import ConfigError

        raise ConfigError(f"--replicas needs Ray ({exc}): pip install 'policyserve[ray]'") from None
    autoscale = parse_autoscale(args.autoscale) if args.autoscale else None
    replicas = args.replicas if args.replicas is not None else autoscale[0]  # type: ignore[index]
    config = RayConfig(replicas=replicas, ray_address=args.ray_address,
                       replica_cpus=1.0 if args.replica_cpus is None else args.replica_cpus,
                       replica_gpus=args.replica_gpus or 0.0, autoscale=autoscale)
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
              f"  Auth: {'api token required' if args.api_token else 'none'}"]
    return lines


def server_config(args: argparse.Namespace):
    """The :class:`~policyserve.serving.server.ServerConfig` the flags describe (sizes in MiB -> bytes)."""
    from ..serving.server import SchedulerConfig, ServerConfig

    return ServerConfig(
        host=args.host, api_token=args.api_token, max_message_bytes=int(args.max_message_mb * 1024 * 1024),
        scheduler=SchedulerConfig(
            max_batch_size=args.max_batch_size, batch_window_ms=args.batch_window_ms,
            rejoin_wait_ms=args.rejoin_wait_ms, max_queued_per_client=args.max_queued_per_client,
            max_queued_bytes=int(args.max_queued_mb * 1024 * 1024)))


def run(args: argparse.Namespace) -> int:
    from ..errors import PolicyServeError
    from ..serving.server import PolicyServer

    print("Starting policyserve inference server...", flush=True)
    for line in _describe(args):
        print(line, flush=True)
    backend = None
    try:
        spec = policy_spec(args)
        config = server_config(args)
        doors = front_doors(args)
        backend = _ray_backend(args, spec)
        if backend is not None:
            for line in backend.describe():
                print(line, flush=True)
        server = PolicyServer(None if backend else spec.build(), backend=backend, port=None, config=config)
        for door in doors:
            server.add_front_door(door)
        server.bind()
    except (PolicyServeError, OSError, ValueError, KeyboardInterrupt) as exc:
        if backend is not None:
            backend.close()
        if isinstance(exc, KeyboardInterrupt):
            return 130
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except ImportError as exc:
        print(f"error: {exc.name or exc} is not installed (pip install 'policyserve[serve]')", file=sys.stderr,
              flush=True)
        return 2
    batching = ("off" if args.max_batch_size == 1 or not server.backend.batchable
                else f"up to {args.max_batch_size} requests per call")
    print(f"  Batching: {batching}", flush=True)

    def _shutdown(signum: int, _frame: object) -> None:
        server.stop(timeout=0)

    signal.signal(signal.SIGTERM, _shutdown)
    signal.signal(signal.SIGINT, _shutdown)
    server.run()
    return 0
