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

    ``env`` and ``driver`` are the command's default configs (their values are the flags' defaults). The task
    and camera size default to what a recorded-demo file (``--hdf5-path``) records, else to ``env``'s; a flag
    that conflicts with the file is an error. The policy seed defaults to the run's seed (``--policy-seed none``:
    unseeded).
    """

    ENV_FIELDS = ("task",)
    SIM_FIELDS = ("camera_size",)
    DRIVER_FIELDS = ("n_action_steps", "ensemble_coef", "async_inference", "async_threshold", "execution",
                     "inference_delay_steps", "rtc_guidance", "rtc_schedule")

    def __init__(self, parser: argparse.ArgumentParser, env: Any, driver: Any) -> None:
        self.env_defaults = env
        self.env_dests = add_config_flags(
            parser, env, self.ENV_FIELDS,
            task=Flag(choices=("lift", "stack"), default=None,
                      help=f"+Default: the task --hdf5-path records (an error when it records none); without "
                           f"--hdf5-path {env.task}."))
        self.sim_dests = add_config_flags(
            parser, env.sim, self.SIM_FIELDS,
            camera_size=Flag(default=None, help="+Default: the camera size --hdf5-path records, else "
                                                f"{'x'.join(map(str, env.camera_size))}; a size other than the one "
                                                "the policy declares gives a warning."))
        from ..client.driver import EXECUTION_MODES
        from ..types import RTC_GUIDANCES, RTC_SCHEDULES

        self.driver_dests = add_config_flags(parser, driver, self.DRIVER_FIELDS,
                                             execution=Flag(choices=EXECUTION_MODES),
                                             rtc_guidance=Flag(choices=RTC_GUIDANCES),
                                             rtc_schedule=Flag(choices=RTC_SCHEDULES))
        parser.add_argument("--key-map", default=None, metavar="FILE",
                            help="JSON key map {video: {policy_key: env_key}, state: {...}, language: env_key}")
        parser.add_argument("--map", action="append", default=[], metavar="M.POLICY=ENV",
                            help="override one key mapping, e.g. video.ego_view=table_cam (repeatable)")
        field_flags(parser)["key_map"] = "--key-map"
        parser.add_argument("--timeout-ms", type=int, default=15000, help="policy request timeout (default 15000)")
        add_policy_seed(parser)

    def env_config(self, args: argparse.Namespace, hdf5_path: str | None = None) -> Any:
        """The EnvConfig of the flags; with ``hdf5_path`` the task and camera size it records fill the flags not
        given (:func:`~policyserve.eval.identity.demo_env_settings`)."""
        from dataclasses import replace

        values = {**config_kwargs(args, self.env_dests), **config_kwargs(args, self.sim_dests)}
        task, size = values["task"], values["camera_size"]
        if hdf5_path:
            from ..data.demos import DemoFile
            from ..eval.identity import demo_env_settings

            task, size = demo_env_settings(DemoFile(hdf5_path), task, size)
        env = self.env_defaults
        return replace(env, task=task or env.task, sim=replace(env.sim, camera_size=size or env.camera_size))

    def driver_config(self, args: argparse.Namespace, run_seed: int | None) -> Any:
        """The DriverConfig of the flags (key map from ``--key-map``/``--map``; ``options={'seed': S}`` with S from
        ``--policy-seed``, by default ``run_seed``)."""
        from ..client.adapter import KeyMap
        from ..client.driver import DriverConfig

        base = KeyMap.from_file(args.key_map) if args.key_map else KeyMap()
        seed = policy_seed(args, run_seed)
        return DriverConfig(**config_kwargs(args, self.driver_dests), key_map=KeyMap.from_pairs(args.map, base),
                            action_options=None if seed is None else {"seed": seed})


RUN_SEED = "run"
"""``--policy-seed``'s default: the run's seed."""


def _seed_or_none(text: str) -> int | str | None:
    if text.strip().lower() in ("none", RUN_SEED):
        return None if text.strip().lower() == "none" else RUN_SEED
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or none, got {text!r}") from None


def add_policy_seed(parser: argparse.ArgumentParser) -> None:
    """``--policy-seed S|run|none``: ``options={'seed': S}`` sent with every ``get_action`` (default: the run's
    seed)."""
    parser.add_argument("--policy-seed", type=_seed_or_none, default=RUN_SEED, metavar="S|run|none",
                        help="send options={'seed': S} with every get_action, so a sampling model server gives the "
                             "same actions for the same observations (default: the run's seed; none: unseeded)")


def policy_seed(args: argparse.Namespace, run_seed: int | None) -> int | None:
    """The policy seed ``--policy-seed`` asks for (``run_seed`` when not given; None for ``none``)."""
    return run_seed if args.policy_seed == RUN_SEED else args.policy_seed


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
