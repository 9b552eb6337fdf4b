"""Counters the store keeps per tier and per codec op, and the frozen snapshots it hands out.

The metrics layer reads :class:`StoreStats` at scrape time; nothing here is global. Counters
are mutated only under the store's index lock (:class:`TierCounters`) or their own lock
(:class:`CodecClock`).

Per-tier counter meanings:

- ``hits``: gets served by this tier.
- ``misses``: gets that reached this tier (no tier above served them) and that it did not
  serve; a get served from ``cold`` is a miss of ``hot`` and ``warm``, a full miss is a miss
  of every tier. ``hits / (hits + misses)`` is the tier's hit ratio in the hierarchy.
- ``demotions``: pages moved down out of this tier; ``promotions``: pages moved up into it.
- ``evictions``: pages dropped from this tier, by :class:`~kvtier.types.EvictionReason`.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

from kvtier.store.policy import PolicyStatus
from kvtier.types import EvictionReason

if TYPE_CHECKING:
    from kvtier.store.redis_shards import RedisHealth, ShardCounters
    from kvtier.store.redis_tier import DeleteCounters


@dataclass(slots=True)
class TierCounters:
    """Mutable counters of one tier; owned by the store, guarded by its index lock."""

    hits: int = 0
    misses: int = 0
    demotions: int = 0
    promotions: int = 0
    evictions: dict[str, int] = field(
        default_factory=lambda: {r.value: 0 for r in EvictionReason}
    )


@dataclass(frozen=True, slots=True)
class TierStats:
    name: str
    medium: str
    codec: str
    capacity_bytes: int
    high_watermark: float
    low_watermark: float
    pages: int
    bytes: int
    hits: int
    misses: int
    demotions: int
    promotions: int
    evictions: Mapping[str, int]
    up: bool = True  # False while a Redis tier is unreachable


@dataclass(frozen=True, slots=True)
class NamespaceUsage:
    """What one namespace holds (or, named ``(other)``, the namespaces past the top
    ``quotas.top_namespaces`` together): stored bytes in the memory tiers, per tier (the Redis
    tier's included), and its quota across the memory tiers (None: none, or several)."""

    name: str
    bytes: int
    tiers: Mapping[str, int]
    quota_bytes: int | None
    namespaces: int = 1  # how many namespaces the row sums


OTHER_NAMESPACES = "(other)"  # sums the namespaces past the top N; never a valid namespace


@dataclass(frozen=True, slots=True)
class StoreStats:
    tiers: tuple[TierStats, ...]
    redis_up: bool  # True when no Redis tier is configured
    codec_seconds: Mapping[tuple[str, str], tuple[float, int]]  # (op, codec) -> (s, count)
    policy: PolicyStatus
    gets: int
    get_hits: int
    get_misses: int
    puts: int
    puts_stored: int
    access_events_dropped: int
    prefetched: int = 0  # pages promoted ahead of use (lookup prefetch, queue hints)
    prefetch_hits: int = 0  # gets served from the top tier by a page promoted ahead
    # the largest namespaces by memory-tier bytes (quotas.top_namespaces), then "(other)"
    namespaces: tuple[NamespaceUsage, ...] = ()
    quota_refusals: int = 0  # puts refused as RESOURCE_EXHAUSTED by a namespace quota


@dataclass(frozen=True, slots=True)
class ShareCounters:
    """What the sharing of new pages did (:mod:`kvtier.store.sharing`)."""

    shared: int  # pages written to the shared tier
    present: int  # pages found there already (another daemon shared them)
    dropped: int  # pages pushed out of a full queue
    failed: int  # writes that failed (shard down, Redis full)


@dataclass(frozen=True, slots=True)
class RedisStatus:
    """The shared Redis tier: health per shard, what its batches met, its deletes, and the
    sharing of new pages (None unless ``share_puts``)."""

    health: RedisHealth
    shards: ShardCounters
    deletes: DeleteCounters
    sharing: ShareCounters | None


class CodecClock:
    """Seconds spent and calls made per (op, codec), e.g. ``("encode", "int8")``. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals: dict[tuple[str, str], tuple[float, int]] = {}

    def add(self, op: str, codec: str, seconds: float) -> None:
        with self._lock:
            s, n = self._totals.get((op, codec), (0.0, 0))
            self._totals[(op, codec)] = (s + seconds, n + 1)

    def snapshot(self) -> Mapping[tuple[str, str], tuple[float, int]]:
        with self._lock:
            return MappingProxyType(dict(self._totals))
