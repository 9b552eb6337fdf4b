"""``kvtier bench security``: what authentication costs a call, against no authentication.

Each mode in :data:`MODES` is one daemon (a ``kvtier serve`` child) configured that way and a
client configured to match; ``plain`` (no tokens) is the baseline the others are divided by.
In one run, for every mode, it times per call:

- ``shm_get``: :meth:`KVTierClient.get` of one page through the same-host shared-memory path;
- ``remote_get``: the same with shared memory off: what a worker on another host gets (page
  bytes over the data channel, whose frames check the token too);
- ``inline_get``: shared memory and the data channel off (page bytes in the gRPC reply);
- ``lookup``: :meth:`KVTierClient.lookup` of an 8-page chain (no page bytes at all: the call's
  fixed cost, where a per-call check weighs most);
- ``shm_put``, ``remote_put``, ``inline_put``: :meth:`KVTierClient.put` of one page on each
  path (a key already stored: the bytes cross and the daemon answers ``exists``).

Pages are ``--page-kib`` KiB (default 64: small pages make a per-call cost show). Modes and
operations run in interleaved rounds, the order rotating each round; each figure is the best
round's mean time per call (the median round is reported too), and the ratio is the mode's
best over ``plain``'s best for the same operation.

A mode is a name, the ``KVTIER_*`` settings of its daemon and the client keyword arguments;
``setup`` may write files the mode needs (a tokens file, a self-signed certificate made by
openssl) into a scratch directory. The TLS modes encrypt the gRPC channel and the data
channel; the shared-memory path moves page bytes outside any socket, so TLS only costs its
control calls.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvtier.lab.bench import progress
from kvtier.lab.bench.transfer import daemon_child

NAMESPACE = "bench"
OPS = ("shm_get", "remote_get", "inline_get", "lookup", "shm_put", "remote_put", "inline_put")
CHAIN = 8


@dataclass(frozen=True)
class ModeSetup:
    """What a mode's ``setup`` returns: the daemon's environment and the client's arguments."""

    env: dict[str, str] = field(default_factory=dict)
    client: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Mode:
    name: str
    setup: Callable[[Path], ModeSetup]
    about: str


def _plain(_: Path) -> ModeSetup:
    return ModeSetup()


def _tokens(scratch: Path) -> ModeSetup:
    from kvtier.transport.auth.tokens import TokenFile

    path = scratch / "tokens.json"
    f = TokenFile(path)
    for i in range(99):  # a file with other tenants in it, as in production
        f.create([f"tenant-{i}"])
    token, _ = f.create([NAMESPACE])
    return ModeSetup({"KVTIER_AUTH__TOKENS_FILE": str(path)}, {"token": token})


def _tls(scratch: Path, mtls: bool = False) -> ModeSetup:
    from kvtier.procs.certs import self_signed

    server = self_signed(scratch, "server")
    env = {"KVTIER_TLS__CERT_FILE": server.cert_file, "KVTIER_TLS__KEY_FILE": server.key_file}
    client: dict[str, Any] = {"tls_ca_file": server.cert_file}
    if mtls:
        pair = self_signed(scratch, "client")
        env["KVTIER_TLS__CLIENT_CA_FILE"] = pair.cert_file
        client.update(tls_cert_file=pair.cert_file, tls_key_file=pair.key_file)
    return ModeSetup(env, client)


def _tokens_tls(scratch: Path) -> ModeSetup:
    tokens, tls = _tokens(scratch), _tls(scratch)
    return ModeSetup({**tokens.env, **tls.env}, {**tokens.client, **tls.client})


MODES: list[Mode] = [
    Mode("plain", _plain, "no authentication (the baseline)"),
    Mode("tokens", _tokens, "tenant tokens: a tokens file of 100 tokens, every call checked"),
    Mode("tls", _tls, "TLS (EC P-256, self-signed) on the gRPC port and the data channel"),
    Mode("mtls", lambda d: _tls(d, mtls=True), "TLS with client certificates (mTLS)"),
    Mode("tokens+tls", _tokens_tls, "tenant tokens over TLS"),
]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("security", help="cost of tokens (and TLS) per call vs none")
    p.add_argument("--page-kib", type=int, default=64, help="page size k+v in KiB")
    p.add_argument("--calls", type=int, default=300, help="calls per operation per round")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (best is kept)")
    p.add_argument("--modes", default=",".join(m.name for m in MODES),
                   help=f"comma-separated modes ({', '.join(m.name for m in MODES)}); the "
                        "first is the baseline")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def _page(page_bytes: int) -> Any:
    from kvtier_client import Page

    # [layers, tokens, kv_heads, head_dim] float16, k and v each page_bytes / 2
    elems = page_bytes // 4
    head_dim = 64
    tokens = max(1, elems // (2 * 2 * head_dim))
    rng = np.random.default_rng(0)
    k = rng.standard_normal((2, tokens, 2, head_dim)).astype(np.float16)
    v = rng.standard_normal((2, tokens, 2, head_dim)).astype(np.float16)
    return Page(k, v, 0)


def measure(modes: list[Mode], page_kib: int = 64, calls: int = 300,
            rounds: int = 7) -> dict[str, Any]:
    from kvtier_client import KVTierClient

    keys = [bytes([7, i]) for i in range(CHAIN)]
    page = _page(page_kib << 10)
    times: dict[tuple[str, str], list[float]] = {(m.name, op): [] for m in modes for op in OPS}
    with ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kvtier-bench-")))
        clients: dict[str, dict[str, Any]] = {}
        for mode in modes:
            (scratch / mode.name).mkdir()
            setup = mode.setup(scratch / mode.name)
            child = stack.enter_context(daemon_child(None, {
                "KVTIER_POLICY__NAME": "lru", **setup.env}))
            shm = KVTierClient(child.grpc, NAMESPACE, shared_memory=True, **setup.client)
            remote = KVTierClient(child.grpc, NAMESPACE, shared_memory=False, **setup.client)
            inline = KVTierClient(child.grpc, NAMESPACE, shared_memory=False,
                                  data_channel=False, **setup.client)
            for c in (shm, remote, inline):
                stack.callback(c.close)
            shm.put(keys, [page] * CHAIN)
            clients[mode.name] = {"shm_get": shm, "remote_get": remote, "inline_get": inline,
                                  "lookup": inline, "shm_put": shm, "remote_put": remote,
                                  "inline_put": inline}
            for _ in range(20):  # warm every path (sessions and connections open on first use)
                for c in (shm, remote, inline):
                    c.get(keys[:1])
            if not shm.uses_shared_memory:
                raise RuntimeError(f"mode {mode.name}: the shared-memory path did not attach")

        def one(mode: str, op: str) -> float:
            c = clients[mode][op]
            t0 = time.perf_counter()
            if op == "lookup":
                for _ in range(calls):
                    c.lookup(keys)
            elif op.endswith("_put"):
                for _ in range(calls):
                    c.put(keys[:1], [page])
            else:
                for _ in range(calls):
                    c.get(keys[:1])
            return (time.perf_counter() - t0) / calls

        steps = [(m.name, op) for op in OPS for m in modes]
        bar = progress(rounds * len(steps), "bench security")
        for rnd in range(rounds):
            shift = rnd % len(steps)
            for mode_name, op in steps[shift:] + steps[:shift]:
                times[(mode_name, op)].append(one(mode_name, op))
                bar.update(1)
        bar.close()
    base = modes[0].name
    res: dict[str, Any] = {"page_bytes": page_kib << 10, "calls": calls, "rounds": rounds,
                           "baseline": base, "modes": {m.name: m.about for m in modes},
                           "rows": []}
    for op in OPS:
        best_base = min(times[(base, op)])
        for m in modes:
            ts = times[(m.name, op)]
            res["rows"].append({"op": op, "mode": m.name, "best_us": min(ts) * 1e6,
                                "median_us": statistics.median(ts) * 1e6,
                                "ratio": min(ts) / best_base,
                                "median_ratio": statistics.median(ts) / statistics.median(
                                    times[(base, op)])})
    return res


def run(args: argparse.Namespace) -> int:
    by_name = {m.name: m for m in MODES}
    names = [n.strip() for n in args.modes.split(",") if n.strip()]
    unknown = [n for n in names if n not in by_name]
    if unknown or not names:
        raise SystemExit(f"kvtier bench security: unknown modes {unknown}; "
                         f"choose from {', '.join(by_name)}")
    res = measure([by_name[n] for n in names], args.page_kib, args.calls, args.rounds)
    if args.json:
        print(json.dumps(res, indent=2, sort_keys=True))
        return 0
    print(f"cost of authentication and TLS per call: {res['page_bytes'] >> 10} KiB float16 "
          f"pages, "
          f"{res['calls']} calls x {res['rounds']} rounds, best round (median round); "
          f"ratio against {res['baseline']!r} in the same run")
    for name, about in res["modes"].items():
        print(f"  {name:<10} {about}")
    print(f"  {'op':<11} {'mode':<10} {'us/call':>9} {'(median)':>10} {'ratio':>7} "
          f"{'(median)':>9}")
    for row in res["rows"]:
        print(f"  {row['op']:<11} {row['mode']:<10} {row['best_us']:9.1f} "
              f"{row['median_us']:10.1f} {row['ratio']:7.3f} {row['median_ratio']:9.3f}")
    return 0
