"""Keeping the index of the shared Redis tier in step with Redis itself.

Several daemons share one Redis, so this daemon's index of the Redis tier can lag: pages other
daemons wrote, pages they deleted, a Redis that came back empty after a restart. Two repairs:

- :func:`discover`: a get or lookup of a key this index does not know asks Redis (one
  pipelined round trip for the batch) and adopts the pages it finds;
- :func:`resync_remote`: at attach and whenever the tier comes back up, a SCAN by prefix
  rebuilds the index (pages survive daemon restarts) and forgets entries whose keys vanished.

A key deleted by someone else between those is simply a miss when read (see
:func:`kvtier.store.transfer.read`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from kvtier.errors import BackendUnavailable
from kvtier.store.engine import TierEngine
from kvtier.types import PageId


def discover(engine: TierEngine, pids: Sequence[PageId], now: float) -> None:
    """Add pages other daemons put in the shared Redis tier to this index.

    Copies this store wrote itself are skipped: not being in the index means this store
    deleted, evicted or moved them and their cleanup is in flight (see redis_tier).
    """
    redis = engine.redis
    if redis is None or engine.redis_tier is None or not redis.up or not pids:
        return
    try:
        metas = redis.metas(pids)
    except BackendUnavailable:
        return
    engine.adopt_remote(((pid, meta) for pid, meta in zip(pids, metas, strict=True)
                         if meta is not None and not redis.wrote(meta.token)), now)


def resync_remote(engine: TierEngine) -> int:
    """Rebuild the Redis tier's index by SCAN; forget entries whose key vanished.

    Returns the number of pages added. Entries committed after the scan started are kept.
    """
    redis = engine.redis
    if redis is None or engine.redis_tier is None or not redis.up:
        return 0
    start_version = engine.version()
    seen: set[PageId] = set()
    added = 0
    now = time.time()
    try:
        for pid, meta in redis.scan():
            seen.add(pid)
            if redis.wrote(meta.token):
                continue  # ours and not indexed: a leftover whose cleanup is in flight
            added += engine.adopt_remote([(pid, meta)], now)
    except BackendUnavailable:
        return added
    engine.forget(engine.drop_vanished_remote(seen, start_version))
    return added
