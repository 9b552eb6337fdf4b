"""Live replay: drive a running daemon with a trace, the way an inference worker would.

Per request: ``lookup`` the chain, ``get`` the present prefix (that is what a worker can reuse),
``put`` the blocks after it that are not stored yet, with page payloads of a configurable size.
Blocks map to keys ``<trace-salt>:<id>`` in one namespace, so two runs do not collide unless
asked to. It reports prefix hits per serving tier, bytes moved, and get latency percentiles.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvtier.errors import InvalidArgument
from kvtier.lab.replay.trace import Trace, TraceRequest
from kvtier_client import KVTierClient, Page

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
            "seconds": round(self.seconds, 3),
        }


def page_tokens(page_bytes: int) -> int:
    """Tokens per page so that k+v of one float16 page of one layer/head is ~page_bytes."""
    if page_bytes < 4 * HEAD_DIM:
        raise InvalidArgument(f"must be at least {4 * HEAD_DIM} bytes, got {page_bytes}",
                              field="page_bytes")
    return page_bytes // (2 * 2 * HEAD_DIM)


def replay_live(trace: Trace, target: str, *, namespace: str = "replay", page_bytes: int = 16384,
                seed: int = 0, salt: str = "",
                progress: Callable[[Iterator[TraceRequest]], Iterator[TraceRequest]] | None = None,
                timeout_s: float = 30.0) -> LiveResult:
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
    t0 = time.perf_counter()
    with KVTierClient(target, namespace=namespace, timeout_s=timeout_s) as client:
        for req in it:
            keys = [prefix + str(b).encode() for b in req.blocks]
            accesses += len(keys)
            found = client.lookup(keys)
            present += sum(t is not None for t in found.tiers)
            n = found.prefix_length
            if n:
                g0 = time.perf_counter()
                pages = client.get(keys[:n])
                lat.append((time.perf_counter() - g0) * 1000.0)
                for p in pages:
                    if p is None:
                        break
                    hits += 1
                    tiers[p.tier] += 1
                    bytes_got += nbytes
            todo = [i for i in range(n, len(keys)) if found.tiers[i] is None]
            if todo:
                client.put([keys[i] for i in todo],
                           [Page(k, v, start_position=TOKENS_PER_BLOCK * i, chain_position=i)
                            for i in todo])
                bytes_put += nbytes * len(todo)
        policy = client.stats().policy
    pct = {}
    if lat:
        arr = np.asarray(lat)
        pct = {f"p{q}": round(float(np.percentile(arr, q)), 3) for q in (50, 95, 99)}
    return LiveResult(policy, len(trace.requests), accesses, hits, present, dict(tiers),
                      bytes_put, bytes_got, pct, time.perf_counter() - t0)
