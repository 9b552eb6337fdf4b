"""``kvtier bench <name>``: benchmarks that print figures (never timed tests).

Each benchmark module listed in :data:`BENCH_MODULES` defines ``register(subparsers) -> None``
adding its own sub-subcommand with ``func`` set (like the top-level subcommands). Adding a
benchmark is a one-line edit here.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

BENCH_MODULES: tuple[str, ...] = (
    "kvtier.lab.bench.codecs",
    "kvtier.lab.bench.gpu",
    "kvtier.lab.bench.transfer",
    "kvtier.lab.bench.ttft",
    "kvtier.lab.bench.chat",
)


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "bench", help="run a benchmark and print its figures (--json for one JSON object)"
    )
    sub = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for name in BENCH_MODULES:
        importlib.import_module(name).register(sub)
