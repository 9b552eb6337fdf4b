"""Live replay: drive a running daemon with a trace, the way an inference worker would.

Per request: ``lookup`` the chain, ``get`` the present prefix (that is what a worker can reuse),
``put`` the blocks after it that are not stored yet, with page payloads of a configurable size.
Blocks map to keys ``<trace-salt>:<id>`` in one namespace, so two runs do not collide unless
asked to. It reports prefix hits per serving tier, bytes moved, and get latency percentiles.

With several targets (daemons on one shared Redis tier) each request goes to one of them,
drawn at random (seeded), so the requests of a conversation land on either, as behind a
load balancer; a hit on a daemon that never put the block is a cross-daemon hit
(``cross_hits``): what sharing the last tier buys.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvtier.errors import InvalidArgument
from kvtier.lab.replay.trace import Trace, TraceRequest
from kvtier_client import DeadlineExceededError, KVTierClient, Page, UnavailableError

TOKENS_PER_BLOCK = 512
HEAD_DIM = 64


@dataclass(frozen=True, slots=True)
class LiveResult:
    policy: str
    requests: int
    accesses: int
    hits: int
    present: int
    tiers: dict[str, int]
    bytes_put: int
    bytes_got: int
    get_ms: dict[str, float]
    seconds: float
    daemons: int = 1
    cross_hits: int = 0  # hits on a daemon that never put the block

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "policy": self.policy, "mode": "live", "requests": self.requests,
            "accesses": self.accesses, "hits": self.hits,
            "hit_ratio": round(self.hit_ratio, 6), "present": self.present,
            "tiers": dict(self.tiers), "bytes_put": self.bytes_put,
            "bytes_got": self.bytes_got, "get_latency_ms": self.get_ms,
            "seconds": round(self.seconds, 3), "daemons": self.daemons,
            "cross_daemon_hits": self.cross_hits,
            "cross_daemon_hit_ratio": round(self.cross_hits / self.accesses, 6)
            if self.accesses else 0.0,
        }


def page_tokens(page_bytes: int) -> int:
    """Tokens per page so that k+v of one float16 page of one layer/head is ~page_bytes."""
    if page_bytes < 4 * HEAD_DIM:
        raise InvalidArgument(f"must be at least {4 * HEAD_DIM} bytes, got {page_bytes}",
                              field="page_bytes")
    return page_bytes // (2 * 2 * HEAD_DIM)


def replay_live(trace: Trace, target: str | Sequence[str], *, namespace: str = "replay",
                page_bytes: int = 16384,
                seed: int = 0, salt: str = "",
                progress: Callable[[Iterator[TraceRequest]], Iterator[TraceRequest]] | None = None,
                timeout_s: float = 30.0) -> LiveResult:
    """Replay ``trace`` against the daemon at ``target`` the way a worker would (see the module
    docstring); InvalidArgument (field ``target``) if no daemon answers there."""
    tokens = page_tokens(page_bytes)
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((1, tokens, 1, HEAD_DIM)).astype(np.float16)
    v = rng.standard_normal((1, tokens, 1, HEAD_DIM)).astype(np.float16)
    nbytes = int(k.nbytes + v.nbytes)
    tiers: Counter[str] = Counter()
    lat: list[float] = []
    hits = present = accesses = bytes_put = bytes_got = 0
    it: Iterator[TraceRequest] = iter(trace.requests)
    if progress is not None:
        it = progress(it)
    prefix = f"{salt or trace.name}:".encode()
    policy = ""
    targets = [target] if isinstance(target, str) else list(target)
    route = np.random.default_rng(seed + 1)
    put_by: dict[int, set[int]] = {}  # block -> the daemons that put it
    cross = 0
    t0 = time.perf_counter()
    with ExitStack() as stack:
        clients = [stack.enter_context(KVTierClient(t, namespace=namespace, timeout_s=timeout_s))
                   for t in targets]
        for t, client in zip(targets, clients, strict=True):
            try:
                client.stats(timeout_s=min(timeout_s, 5.0))
            except (UnavailableError, DeadlineExceededError) as e:
                raise InvalidArgument(f"no kvtier daemon answers at {t} ({e.code}: "
                                      f"{e.message})", field="target") from None
        for req in it:
            d = int(route.integers(len(clients))) if len(clients) > 1 else 0
            client = clients[d]
            keys = [prefix + str(b).encode() for b in req.blocks]
            accesses += len(keys)
            found = client.lookup(keys)
            present += sum(t is not None for t in found.tiers)
            n = found.prefix_length
            if n:
                g0 = time.perf_counter()
                pages = client.get(keys[:n])
                lat.append((time.perf_counter() - g0) * 1000.0)
                for b, p in zip(req.blocks, pages, strict=False):
                    if p is None:
                        break
                    hits += 1
                    cross += d not in put_by.get(b, (d,))
                    tiers[p.tier] += 1
                    bytes_got += nbytes
            todo = [i for i in range(n, len(keys)) if found.tiers[i] is None]
            if todo:
                client.put([keys[i] for i in todo],
                           [Page(k, v, start_position=TOKENS_PER_BLOCK * i, chain_position=i)
                            for i in todo])
                bytes_put += nbytes * len(todo)
                for i in todo:
                    put_by.setdefault(req.blocks[i], set()).add(d)
        policy = clients[0].stats().policy
    pct = {}
    if lat:
        arr = np.asarray(lat)
        pct = {f"p{q}": round(float(np.percentile(arr, q)), 3) for q in (50, 95, 99)}
    return LiveResult(policy, len(trace.requests), accesses, hits, present, dict(tiers),
                      bytes_put, bytes_got, pct, time.perf_counter() - t0, len(targets), cross)
