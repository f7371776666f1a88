"""Argument helpers shared by several commands."""

from __future__ import annotations

import argparse
import os


def add_server_address(parser: argparse.ArgumentParser, *, host: str = "127.0.0.1", port: int = 5555) -> None:
    parser.add_argument("--host", default=host, help=f"address (default {host}; 0.0.0.0 for all interfaces)")
    parser.add_argument("--port", type=int, default=port, help=f"TCP port (default {port})")


def add_api_token(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--api-token",
        default=os.environ.get("POLICYSERVE_API_TOKEN"),
        help="shared secret required on every request (default: $POLICYSERVE_API_TOKEN)",
    )


def parse_size(text: str) -> tuple[int, int]:
    """'128' or '128x96' (HxW) -> (H, W)."""
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SIZE or HxW, got {text!r}") from None
    if len(values) == 1:
        values *= 2
    if len(values) == 2 and min(values) >= 1:
        return values[0], values[1]
    raise argparse.ArgumentTypeError(f"expected SIZE or HxW, got {text!r}")


def add_ray_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """--workers and --ray-address (distributed evaluation on Ray)."""
    parser.add_argument("--workers", type=int, default=None, metavar="K",
                        help=f"run the {what} on K Ray worker actors (a local Ray instance unless --ray-address); "
                             "without it nothing imports Ray")
    parser.add_argument("--ray-address", default=None, metavar="ADDR",
                        help="with --workers: the Ray cluster to run on (e.g. 10.0.0.5:6379, as 'ray start --head' "
                             "prints it); it is left running at exit")


def distributed_config_from_args(args: argparse.Namespace) -> object | None:
    """The DistributedConfig of --workers/--ray-address, None without --workers; ConfigError for bad values."""
    from ..errors import ConfigError

    if args.workers is None:
        if args.ray_address:
            raise ConfigError("--ray-address needs --workers K (how many Ray workers to run)")
        return None
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    from ..eval.distributed import DistributedConfig

    return DistributedConfig(workers=args.workers, address=args.ray_address)
