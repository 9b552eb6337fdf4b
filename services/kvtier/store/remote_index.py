"""Keeping the index of the shared Redis tier in step with Redis itself.

Several daemons share one Redis, so this daemon's index of the Redis tier can lag: pages other
daemons wrote, pages they deleted, a Redis that came back empty after a restart. Two repairs:

- :func:`discover`: a get or lookup of a key this index does not know asks Redis (one
  pipelined round trip for the batch) and adopts the pages it finds;
- :func:`resync_remote`: at attach and whenever the tier comes back up, a SCAN by prefix
  rebuilds the index (pages survive daemon restarts) and forgets entries whose keys vanished.

A key deleted by someone else between those is simply a miss when read (see the engine).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvtier.errors import BackendUnavailable
from kvtier.store.index import PageState
from kvtier.types import EvictionReason, PageId

if TYPE_CHECKING:
    from kvtier.store.engine import TierEngine


def discover(engine: TierEngine, pids: Sequence[PageId], now: float) -> None:
    """Add pages other daemons put in the shared Redis tier to this index.

    Copies this store wrote itself are skipped: not being in the index means this store
    deleted, evicted or moved them and their cleanup is in flight (see redis_tier).
    """
    if engine.redis is None or engine.redis_tier is None or not engine.redis.up or not pids:
        return
    try:
        metas = engine.redis.metas(pids)
    except BackendUnavailable:
        return
    with engine.cond:
        for pid, meta in zip(pids, metas, strict=True):
            if meta is not None and not engine.redis.wrote(meta.token):
                engine.index.add_resident(pid, engine.redis_tier, meta.nbytes,
                                        meta.stored_bytes, meta.precision,
                                        meta.chain_position, now, meta.token)


def resync_remote(engine: TierEngine) -> int:
    """Rebuild the Redis tier's index by SCAN; forget entries whose key vanished.

    Returns the number of pages added. Entries committed after the scan started are kept.
    """
    if engine.redis is None or engine.redis_tier is None or not engine.redis.up:
        return 0
    t = engine.redis_tier
    with engine.cond:
        start_version = engine.index.version
    seen: set[PageId] = set()
    added = 0
    now = time.time()
    try:
        for pid, meta in engine.redis.scan():
            seen.add(pid)
            if engine.redis.wrote(meta.token):
                continue  # ours and not indexed: a leftover whose cleanup is in flight
            with engine.cond:
                added += engine.index.add_resident(pid, t, meta.nbytes, meta.stored_bytes,
                                                 meta.precision, meta.chain_position, now,
                                                 meta.token)
    except BackendUnavailable:
        return added
    lost = []
    with engine.cond:
        for pid in engine.index.pages_in(t):
            rec = engine.index.get(pid)
            if (rec is not None and pid not in seen and rec.version < start_version
                    and rec.state is PageState.RESIDENT):
                engine.index.remove(pid)
                engine.counters[t].evictions[EvictionReason.REMOTE_DOWN.value] += 1
                lost.append(pid)
    engine.forget(lost)
    return added
