"""The ``kvtier`` command line. Each subcommand lives in its own module with ``register()``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from kvtier.errors import ConfigError

# Modules that add subcommands; each defines ``register(subparsers) -> None`` and sets
# ``func`` on its parser to a callable taking the parsed namespace and returning an exit code.
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "kvtier.cli.serve", "kvtier.cli.up", "kvtier.cli.bench", "kvtier.cli.eval",
    "kvtier.cli.replay", "kvtier.cli.policy",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvtier", description="Disaggregated KV-cache tiering service for LLM inference."
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        rc: int = args.func(args)
    except ConfigError as e:
        print(f"kvtier: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return rc


if __name__ == "__main__":
    sys.exit(main())
