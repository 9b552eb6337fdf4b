"""The ``kvtier`` command as a new user meets it: quick help, a version, help on every option, and
one-line errors (no tracebacks) for what a user can fix."""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import kvtier
from kvtier.cli import build_parser
from kvtier.cli.bench import BENCH_HELP, BENCH_MODULES, LazySubcommands

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "numba", "pydantic", "numpy", "grpc", "fastapi", "kvtier_client")


def _kvtier(*args: str, env: dict[str, str] | None = None,
            code: str | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("KVTIER_")}
    base.update(env or {})
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "kvtier.cli"]
    return subprocess.run([*cmd, *args], env=base, capture_output=True, text=True, timeout=120)


def test_help_loads_nothing_heavy() -> None:
    """The parser, benchmarks listed, is built from the standard library alone: quick, and
    possible where only the client is installed."""
    code = ("import sys\nfrom kvtier.cli import build_parser\nbuild_parser()\n"
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    res = _kvtier(code=code)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr
    res = _kvtier("--help")
    assert res.returncode == 0 and "COMMAND" in res.stdout and "--version" in res.stdout


def test_version_is_written_once() -> None:
    res = _kvtier("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"kvtier {kvtier.__version__}"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    out = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name in list(action.choices):
                sub = action.load(name) if isinstance(action, LazySubcommands) else \
                    action.choices[name]
                out += _parsers(sub)
    return out


def test_every_option_says_what_it_does() -> None:
    missing = [f"{p.prog} {a.option_strings or a.dest}" for p in _parsers(build_parser())
               for a in p._actions
               if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
               and not a.help]
    assert not missing, f"options without help text: {missing}"


def test_every_benchmark_is_listed_with_its_own_description() -> None:
    sub = argparse.ArgumentParser().add_subparsers()
    for module in BENCH_MODULES:
        name = module.rsplit(".", 1)[1]
        __import__(module, fromlist=["register"]).register(sub)
        assert BENCH_HELP[name] == sub._choices_actions[-1].help, name


def test_a_client_only_install_names_the_extra_to_install() -> None:
    code = ("import sys\nfor m in ('pydantic', 'pydantic_settings', 'torch'):\n"
            "    sys.modules[m] = None  # not installed\n"
            "from kvtier.cli import main\nsys.exit(main(sys.argv[1:]))")
    res = _kvtier("serve", code=code)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().endswith("pip install 'kvtier[server]'"), res.stderr


def test_a_grpc_port_in_use_is_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = _kvtier("serve", env={"KVTIER_GRPC_PORT": str(port), "KVTIER_HTTP_PORT": "0"})
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert re.search(rf"kvtier: grpc_port: cannot bind gRPC to 127.0.0.1:{port}",
                     res.stderr), res.stderr


@pytest.mark.parametrize("target", ["127.0.0.1:1"])
def test_live_replay_against_no_daemon_is_one_line(target: str, tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"timestamp": 0, "input_length": 512, "output_length": 1, '
                     '"hash_ids": [1, 2]}\n')
    res = _kvtier("replay", str(trace), "--live", "--target", target)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"no kvtier daemon answers at {target}" in res.stderr, res.stderr
