"""Trace simulation: replay a trace against a cache model, single cache or a tier stack.

One block is one slot and requests are replayed in file order. ``prefix_hits``, the measure
that counts, is the leading run of hits of each request: the part a paged KV cache can actually
reuse (a hit on block k needs 0..k-1). A hit (``hits``) is any access that finds its block
resident, usable or not. In tier mode the stack is exclusive (a block lives in one tier): misses
are admitted into the top tier, each tier's evictions are demoted into the next, the last
tier's evictions leave, and a hit in a lower tier promotes the block back to the top.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvtier.errors import InvalidArgument
from kvtier.lab.replay.belady import belady_hits
from kvtier.lab.replay.hints import TraceHints
from kvtier.policy.core import Key, ReplacementCore
from kvtier.lab.replay.trace import Trace, TraceRequest

CoreFactory = Callable[[int], ReplacementCore]
Progress = Callable[[Iterator[TraceRequest]], Iterator[TraceRequest]]


@dataclass(frozen=True, slots=True)
class SimResult:
    """What one replay measured. ``request_hits``/``request_accesses`` feed the bootstrap."""

    policy: str
    capacity_blocks: int
    requests: int
    accesses: int
    hits: int
    prefix_hits: int
    tiers: dict[str, int]
    tier_capacities: dict[str, int]
    request_hits: tuple[int, ...] = field(repr=False)
    request_accesses: tuple[int, ...] = field(repr=False)
    seconds: float
    detail: str = ""
    request_prefix_hits: tuple[int, ...] = field(default=(), repr=False)

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0

    @property
    def prefix_hit_ratio(self) -> float:
        """The leading run of each request's blocks that hit: what a paged cache can use."""
        return self.prefix_hits / self.accesses if self.accesses else 0.0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "policy": self.policy,
            "capacity_blocks": self.capacity_blocks,
            "requests": self.requests,
            "accesses": self.accesses,
            "prefix_hits": self.prefix_hits,
            "prefix_hit_ratio": round(self.prefix_hit_ratio, 6),
            "hits": self.hits,
            "hit_ratio": round(self.hit_ratio, 6),
        }
        if self.tiers:
            out["tiers"] = dict(self.tiers)
            out["tier_capacities"] = dict(self.tier_capacities)
        if self.detail:
            out["detail"] = self.detail
        return out


def capacity_blocks(trace: Trace, capacity: float) -> int:
    """``capacity`` below 1 is a fraction of the trace's distinct blocks; else a count."""
    if capacity <= 0:
        raise InvalidArgument(f"must be positive, got {capacity}", field="capacity")
    if capacity < 1:
        return max(1, int(capacity * trace.distinct_blocks()))
    if capacity != int(capacity):
        raise InvalidArgument(f"an absolute capacity must be a whole number of blocks, got "
                              f"{capacity}", field="capacity")
    return int(capacity)


def split_capacity(total: int, weights: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    """Split ``total`` slots over tiers in proportion to their byte capacities (>= 1 each)."""
    if total < len(weights):
        raise InvalidArgument(f"{total} slots cannot hold {len(weights)} tiers", field="capacity")
    wsum = sum(w for _, w in weights)
    sizes = [max(1, total * w // wsum) for _, w in weights]
    sizes[-1] += total - sum(sizes)
    return [(name, size) for (name, _), size in zip(weights, sizes, strict=True)]


def _iterate(trace: Trace, progress: Progress | None) -> Iterator[TraceRequest]:
    it: Iterator[TraceRequest] = iter(trace.requests)
    return progress(it) if progress is not None else it


def simulate(trace: Trace, policy: str, factory: CoreFactory, capacity: int,
             tiers: Sequence[tuple[str, int]] | None = None,
             progress: Progress | None = None, hints: TraceHints | None = None) -> SimResult:
    """Replay ``trace`` through cores built by ``factory``: one of ``capacity`` slots, or one
    per tier with the given slot counts (their sum is the capacity). With ``hints`` the top
    core hears the worker's queue and session hints before each request
    (:mod:`kvtier.lab.replay.hints` says what they may know)."""
    stack = [(name, factory(slots)) for name, slots in (tiers or [("cache", capacity)])]
    tier_hits = [0] * len(stack)
    top = stack[0][1]
    req_hits: list[int] = []
    req_acc: list[int] = []
    req_prefix: list[int] = []
    hits = prefix_hits = 0
    t0 = time.perf_counter()
    for i, req in enumerate(_iterate(trace, progress)):
        now_s = req.timestamp_ms / 1000.0
        blocks = req.blocks
        if hints is not None:
            h_i = hints.at(i)
            top.hint_queue(h_i.queue)
            top.hint_session(h_i.session, h_i.ended)
        top.begin_request(blocks, now_s)
        p0 = prefix_hits
        h = 0
        leading = True
        for key in blocks:
            level = _find(stack, key)
            if level == 0:
                top.hit(key)
            elif level > 0:
                stack[level][1].remove(key)
                _cascade(stack, 0, key)
            else:
                leading = False
                if top.admit(key):
                    _cascade(stack, 0, key)
                continue
            tier_hits[level] += 1
            h += 1
            if leading:
                prefix_hits += 1
        hits += h
        req_hits.append(h)
        req_acc.append(len(blocks))
        req_prefix.append(prefix_hits - p0)
    seconds = time.perf_counter() - t0
    status = getattr(top, "detail", "")
    return SimResult(
        policy=policy, capacity_blocks=sum(c.capacity for _, c in stack),
        requests=len(req_hits), accesses=sum(req_acc), hits=hits, prefix_hits=prefix_hits,
        tiers={name: tier_hits[i] for i, (name, _) in enumerate(stack)} if tiers else {},
        tier_capacities={name: c.capacity for name, c in stack} if tiers else {},
        request_hits=tuple(req_hits), request_accesses=tuple(req_acc),
        seconds=seconds, detail=status if isinstance(status, str) else "",
        request_prefix_hits=tuple(req_prefix),
    )


def _find(stack: Sequence[tuple[str, ReplacementCore]], key: Key) -> int:
    for i, (_, core) in enumerate(stack):
        if key in core:
            return i
    return -1


def _cascade(stack: Sequence[tuple[str, ReplacementCore]], level: int, key: Key) -> None:
    """Insert ``key`` at ``level``; whatever that evicts is demoted one tier down."""
    pending = [key]
    while pending and level < len(stack):
        core = stack[level][1]
        demoted: list[Key] = []
        for k in pending:
            demoted.extend(core.insert(k))
        pending = demoted
        level += 1


def simulate_belady(trace: Trace, capacity: int, progress: Progress | None = None) -> SimResult:
    """MIN with bypass over the single cache (the upper bound; no tier breakdown)."""
    t0 = time.perf_counter()
    accesses = [b for r in _iterate(trace, progress) for b in r.blocks]
    flags = belady_hits(accesses, capacity)
    req_hits: list[int] = []
    req_acc: list[int] = []
    req_prefix: list[int] = []
    i = 0
    for req in trace.requests:
        n = len(req.blocks)
        window = flags[i:i + n]
        req_hits.append(sum(window))
        req_acc.append(n)
        lead = 0
        for f in window:
            if not f:
                break
            lead += 1
        req_prefix.append(lead)
        i += n
    prefix_hits = sum(req_prefix)
    return SimResult(
        policy="belady", capacity_blocks=capacity, requests=len(req_hits),
        accesses=len(accesses), hits=sum(req_hits), prefix_hits=prefix_hits, tiers={},
        tier_capacities={}, request_hits=tuple(req_hits), request_accesses=tuple(req_acc),
        seconds=time.perf_counter() - t0, request_prefix_hits=tuple(req_prefix),
    )
