"""Flags shared by several commands: server address and API token, Ray workers, the env and driver of an
evaluation (camera size, key map, seeds, chunk execution), and the hint for a server that does not answer.

Flags that set a config field are derived from the field (:mod:`policyserve.cli.flags`); the helpers here
return the ``{field: dest}`` maps that turn parsed arguments back into the configs.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from .flags import Flag, add_config_flags, config_kwargs, field_flags


def add_server_address(parser: argparse.ArgumentParser, *, host: str = "127.0.0.1", port: int = 5555) -> None:
    """``--host`` and ``--port`` of the server to serve on or to reach."""
    parser.add_argument("--host", default=host, help=f"address (default {host}; 0.0.0.0 for all interfaces)")
    parser.add_argument("--port", type=int, default=port, help=f"TCP port (default {port})")


def add_api_token(parser: argparse.ArgumentParser) -> None:
    """``--api-token`` (default ``$POLICYSERVE_API_TOKEN``)."""
    parser.add_argument(
        "--api-token",
        default=os.environ.get("POLICYSERVE_API_TOKEN"),
        help="shared secret required on every request (default: $POLICYSERVE_API_TOKEN)",
    )


def add_ray_arguments(parser: argparse.ArgumentParser, what: str) -> dict[str, str]:
    """``--workers`` and ``--ray-address`` (distributed evaluation on Ray; DistributedConfig fields)."""
    from ..eval.distributed import DistributedConfig

    return add_config_flags(
        parser, DistributedConfig, ["workers", "address"],
        workers=Flag(default=None, metavar="K",
                     help=f"run the {what} on K Ray worker actors (a local Ray instance unless --ray-address); "
                          "without it nothing imports Ray"),
        address=Flag(name="ray-address", metavar="ADDR", help="+With --workers; it is left running at exit."),
    )


def distributed_config_from_args(args: argparse.Namespace, dests: dict[str, str]) -> Any:
    """The DistributedConfig of ``--workers``/``--ray-address``; None without ``--workers``."""
    from ..errors import ConfigError

    values = config_kwargs(args, dests)
    if values["workers"] is None:
        if values["address"]:
            raise ConfigError("--ray-address needs --workers K (how many Ray workers to run)")
        return None
    from ..eval.distributed import DistributedConfig

    return DistributedConfig(**values)


class EvalFlags:
    """The env, key-map, policy-seed and driver flags of ``rollout`` and ``compare``, and their configs.

    ``env`` and ``driver`` are the command's default configs (their values are the flags' defaults).
    """

    ENV_FIELDS = ("task", "camera_size")
    DRIVER_FIELDS = ("n_action_steps", "ensemble_coef", "async_inference", "async_threshold")

    def __init__(self, parser: argparse.ArgumentParser, env: Any, driver: Any) -> None:
        self.env_dests = add_config_flags(parser, env, self.ENV_FIELDS, task=Flag(choices=("lift", "stack")))
        self.driver_dests = add_config_flags(parser, driver, self.DRIVER_FIELDS)
        parser.add_argument("--key-map", default=None, metavar="FILE",
                            help="JSON key map {video: {policy_key: env_key}, state: {...}, language: env_key}")
        parser.add_argument("--map", action="append", default=[], metavar="M.POLICY=ENV",
                            help="override one key mapping, e.g. video.ego_view=table_cam (repeatable)")
        field_flags(parser)["key_map"] = "--key-map"
        parser.add_argument("--timeout-ms", type=int, default=15000, help="policy request timeout (default 15000)")
        add_policy_seed(parser)

    def env_config(self, args: argparse.Namespace) -> Any:
        """The EnvConfig of the flags."""
        from ..eval.envs import EnvConfig

        return EnvConfig(**config_kwargs(args, self.env_dests))

    def driver_config(self, args: argparse.Namespace) -> Any:
        """The DriverConfig of the flags (key map from ``--key-map``/``--map``, options from ``--policy-seed``)."""
        from ..client.adapter import KeyMap
        from ..client.driver import DriverConfig

        base = KeyMap.from_file(args.key_map) if args.key_map else KeyMap()
        return DriverConfig(**config_kwargs(args, self.driver_dests), key_map=KeyMap.from_pairs(args.map, base),
                            action_options=None if args.policy_seed is None else {"seed": args.policy_seed})


def add_policy_seed(parser: argparse.ArgumentParser) -> None:
    """``--policy-seed S``: ``options={'seed': S}`` sent with every ``get_action``."""
    parser.add_argument("--policy-seed", type=int, default=None, metavar="S",
                        help="send options={'seed': S} with every get_action (deterministic model servers)")


def add_progress(parser: argparse.ArgumentParser, config: Any) -> dict[str, str]:
    """``--progress/--no-progress`` from the config's ``progress`` field, and ``--quiet`` (= ``--no-progress``)."""
    dests = add_config_flags(parser, config, ["progress"], progress=Flag(help="show progress bars"))
    parser.add_argument("--quiet", dest=dests["progress"], action="store_false", help="same as --no-progress")
    return dests


def server_hint(port: int) -> str:
    """What to try when no server answers at ``port`` (the CLI's addition to the library's error)."""
    return f"start one with 'policyserve serve --port {port} ...' or check --host/--port/--api-token"


def embodiment_hint(exc: BaseException, args: argparse.Namespace) -> str | None:
    """An ``error_hint`` for an embodiment tag with no registered modality config: which flags to use instead."""
    from ..registry import UnknownEmbodimentError

    if not isinstance(exc, UnknownEmbodimentError):
        return None
    source = ("inferred from the dataset" if getattr(args, "dataset_path", None)
              else "read from the checkpoint" if getattr(args, "model_path", None) else None)
    leave_out = f"leave --embodiment-tag out (the modality config is then {source}) or " if source else ""
    return f"{leave_out}give the modality config as a JSON file with --modality-config-path FILE"


def first_hint(*hints: Any) -> Any:
    """One ``error_hint`` of several: the first that has something to say."""

    def hint(exc: BaseException, args: argparse.Namespace) -> str | None:
        return next((text for text in (h(exc, args) for h in hints) if text), None)

    return hint


def unavailable_server_hint(port_of: Any) -> Any:
    """An ``error_hint`` for main: :func:`server_hint` of ``port_of(exc, args)`` for a server that does not answer."""

    def hint(exc: BaseException, args: argparse.Namespace) -> str | None:
        from ..client.connect import ServerUnavailableError

        return server_hint(port_of(exc, args)) if isinstance(exc, ServerUnavailableError) else None

    return hint
