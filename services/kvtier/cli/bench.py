"""``kvtier bench <name>``: benchmarks that print figures (never timed tests).

Each benchmark module listed in :data:`BENCH_MODULES` defines ``register(subparsers) -> None``
adding its own sub-subcommand with ``func`` set (like the top-level subcommands). Adding a
benchmark is a one-line edit here, plus its one-line description in :data:`BENCH_HELP`.

The modules are imported only when their benchmark is chosen: ``kvtier --help`` and
``kvtier bench --help`` list them from here without loading torch or a model.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from typing import Any, cast

BENCH_MODULES: tuple[str, ...] = (
    "kvtier.lab.bench.codecs",
    "kvtier.lab.bench.gpu",
    "kvtier.lab.bench.transfer",
    "kvtier.lab.bench.ttft",
    "kvtier.lab.bench.chat",
    "kvtier.lab.bench.shared",
    "kvtier.lab.bench.security",
)
BENCH_HELP: dict[str, str] = {
    "codecs": "encode/decode throughput of int8/int4/int4a/int3 vs memcpy",
    "transfer": "client page throughput vs redis-py and a socket",
    "ttft": "time to first token of SmolLM2 with its prompt prefix served by kvtier",
    "chat": "multi-turn chat replay through SmolLM2 with and without kvtier",
    "shared": "shared Redis tier through a daemon: Redis Cluster vs one Redis",
    "gpu": "device codecs and device<->host moves vs device memcpy",
    "security": "cost of tokens (and TLS) per call vs none",
}


class LazySubcommands(argparse._SubParsersAction):  # type: ignore[type-arg]
    """Subcommands listed by name and help, whose modules register their real parser only
    when one of them is chosen on the command line."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lazy: dict[str, str] = {}

    def add_lazy(self, name: str, module: str, help: str) -> None:  # noqa: A002 - argparse's
        self._lazy[name] = module
        self.add_parser(name, help=help, add_help=False)

    def load(self, name: str) -> argparse.ArgumentParser:
        """The real parser of ``name``, registering it by its module on first use."""
        module = self._lazy.pop(name, None)
        if module is not None:
            del self._name_parser_map[name]
            importlib.import_module(module).register(self)
        parser: argparse.ArgumentParser = self._name_parser_map[name]
        return parser

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        if isinstance(values, list) and values and values[0] in self._lazy:
            self.load(values[0])
        super().__call__(parser, namespace, values, option_string)


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "bench", help="run a benchmark and print its figures (--json for one JSON object)"
    )
    parser.register("action", "lazy_parsers", LazySubcommands)
    sub = cast(LazySubcommands, parser.add_subparsers(
        dest="bench", required=True, metavar="BENCH", action="lazy_parsers"))
    for module in BENCH_MODULES:
        name = module.rsplit(".", 1)[1]
        sub.add_lazy(name, module, BENCH_HELP.get(name, ""))
