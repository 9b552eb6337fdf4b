"""This daemon's view of the shared Redis tier, kept in step with Redis itself.

The index's Redis tier is a *view*: the shared pages this daemon knows of, with their meta (for
the policy, prefetch and the admin API). Redis holds the truth: other daemons write and delete
pages, Redis evicts them under ``maxmemory`` or lets them expire, a shard fails over. So the
request path asks Redis, once per batch, about every key this daemon does not hold in memory:

- :func:`fetch` (get): the blob and meta of each such key in one round trip (one pipeline per
  shard, all shards at once); pages found are adopted into the view and served, entries whose
  key vanished are forgotten, keys whose shard is down are misses;
- :func:`refresh` (lookup): the same without the blobs;
- :func:`discover` (promote, demote, admin): adopts pages the view does not know;
- :func:`resync_remote`: at attach and whenever the tier comes back up, a SCAN of every primary
  fills the view (a restarted daemon knows the shared pages before anyone asks) until it is
  full, and, when it saw every key, forgets entries whose key vanished.

The view is bounded by the Redis tier's ``capacity_bytes``: past it the mover forgets the
lowest-scored entries (counted as evictions with reason ``capacity``) and never deletes a
shared page; Redis' own ``maxmemory`` policy bounds the shared tier itself. Copies this daemon
wrote are adopted like anyone's: a page it promoted (the shared copy stays) and later evicted
from memory is found again in the shared tier.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from kvtier.errors import BackendUnavailable
from kvtier.store.engine import TierEngine
from kvtier.store.redis_shards import UNAVAILABLE, Unavailable
from kvtier.store.redis_tier import Found
from kvtier.types import PageId, Precision


def _settle(engine: TierEngine, ask: Sequence[PageId], known: dict[PageId, int],
            got: Sequence[object], now: float) -> None:
    """Adopt what Redis has that the view lacks; forget entries whose key is gone."""
    engine.adopt_remote(((pid, g.meta) for pid, g in zip(ask, got, strict=True)
                         if isinstance(g, Found) and pid not in known), now)
    engine.forget(engine.drop_remote_unchanged(
        (pid, known[pid]) for pid, g in zip(ask, got, strict=True)
        if g is None and pid in known))


def _ask(engine: TierEngine, pids: Sequence[PageId], now: float,
         blobs: bool) -> list[tuple[PageId, Found | None | Unavailable]]:
    """Ask Redis about every page of ``pids`` not in this daemon's memory (one round trip) and
    bring the view in step; the answers (UNAVAILABLE for all when Redis is down)."""
    redis = engine.redis
    if redis is None or engine.redis_tier is None or not redis.up or not pids:
        return []
    ask, known = engine.ask_redis(pids)
    if not ask:
        return []
    try:
        got = redis.fetch(ask, blobs=blobs)
    except BackendUnavailable:
        return [(pid, UNAVAILABLE) for pid in ask]
    _settle(engine, ask, known, got, now)
    return list(zip(ask, got, strict=True))


def fetch(engine: TierEngine, pids: Sequence[PageId],
          now: float) -> dict[PageId, tuple[bytes, Precision]]:
    """The blobs of the pages of ``pids`` that are in Redis and not in this daemon's memory,
    in one round trip, with the precision each has passed through; the view follows."""
    return {pid: (g.blob, g.meta.precision) for pid, g in _ask(engine, pids, now, True)
            if isinstance(g, Found) and g.blob is not None}


def refresh(engine: TierEngine, pids: Sequence[PageId], now: float) -> dict[PageId, bool]:
    """Whether Redis holds each page of ``pids`` that is not in this daemon's memory (one round
    trip; False when its shard is down); the view follows. Pages it did not ask about (held in
    memory, or mid-move) are absent from the answer."""
    return {pid: isinstance(g, Found) for pid, g in _ask(engine, pids, now, False)}


def discover(engine: TierEngine, pids: Sequence[PageId], now: float) -> None:
    """Add pages other daemons (or this one, earlier) put in the shared tier to the view."""
    redis = engine.redis
    if redis is None or engine.redis_tier is None or not redis.up or not pids:
        return
    unknown = engine.unknown(dict.fromkeys(pids))
    if not unknown:
        return
    try:
        got = redis.fetch(unknown, blobs=False)
    except BackendUnavailable:
        return
    engine.adopt_remote(((pid, g.meta) for pid, g in zip(unknown, got, strict=True)
                         if isinstance(g, Found)), now)


def resync_remote(engine: TierEngine) -> int:
    """Fill the view by a SCAN of every primary; forget entries whose key vanished.

    Adopts pages until the view reaches its high watermark, then stops scanning (the request
    path finds the rest). Entries whose key the scan did not see are forgotten only after a
    scan that covered every key; entries committed after the scan started are kept. Returns
    the number of pages added.
    """
    redis = engine.redis
    t = engine.redis_tier
    if redis is None or t is None or not redis.up:
        return 0
    start_version = engine.version()
    seen: set[PageId] = set()
    added = 0
    now = time.time()
    try:
        for pid, meta in redis.scan():
            seen.add(pid)
            adopted = engine.adopt_if_room(pid, meta, now)
            if adopted is None:
                return added
            added += adopted
    except BackendUnavailable:
        return added
    engine.forget(engine.drop_vanished_remote(seen, start_version))
    return added
