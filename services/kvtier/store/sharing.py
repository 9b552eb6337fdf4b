"""Sharing new pages: each put's page written to the shared Redis tier in the background.

A page reaches the shared tier when this daemon demotes it there, which may be long after
another node could have used it. With ``KVTIER_REDIS__SHARE_PUTS=true`` a put also queues its
new pages here, and every pass of the store's mover shares a batch of them::

    pick       (lock)     pages still in a memory tier; gone or already in the Redis tier: skip
    ask Redis  (1 trip)   which of them some daemon shared already (same key, same bytes):
                          those are neither encoded nor sent again
    encode     (no lock)  the others to the Redis tier's codec (as a demotion would)
    write      (1 trip)   all of them; a page deleted meanwhile has its copy removed again

The page stays where it was put (the shared copy is not in this daemon's index; a later
demotion writes the same bytes again). Nothing here blocks a put: the queue is bounded
(``QUEUE_PAGES``) and a page pushed out of a full queue is only shared later, by its demotion
(counted as ``dropped``). Costs: one encode per shared page on the mover thread and its bytes on
the network, once per cluster rather than once per daemon thanks to the ask.
"""

from __future__ import annotations

import collections
import logging
import threading
from kvtier.errors import BackendUnavailable, CorruptPage
from kvtier.store.engine import TierEngine
from kvtier.store.redis_tier import Found, RemoteMeta
from kvtier.store.stats import ShareCounters
from kvtier.store.tiers import blob_of
from kvtier.types import PageId

log = logging.getLogger(__name__)

QUEUE_PAGES = 4096
BATCH_PAGES = 32
BATCHES_PER_PASS = 8  # so that a long queue does not hold the mover's demotions back


class Sharer:
    """The queue of pages to share and the pass that shares them. Thread-safe."""

    def __init__(self, queue_pages: int = QUEUE_PAGES, batch_pages: int = BATCH_PAGES) -> None:
        self._lock = threading.Lock()
        self._queue: collections.deque[PageId] = collections.deque()
        self._limit = queue_pages
        self._batch = batch_pages
        self._shared = self._present = self._dropped = self._failed = 0

    def offer(self, pids: list[PageId]) -> None:
        """Queue pages a put stored."""
        with self._lock:
            for pid in pids:
                if len(self._queue) >= self._limit:
                    self._queue.popleft()
                    self._dropped += 1
                self._queue.append(pid)

    def pending(self) -> int:
        with self._lock:
            return len(self._queue)

    def counters(self) -> ShareCounters:
        with self._lock:
            return ShareCounters(self._shared, self._present, self._dropped, self._failed)

    def run(self, engine: TierEngine) -> int:
        """Share queued pages, at most ``BATCHES_PER_PASS`` batches, until the queue is empty
        or Redis stops taking them; returns the number written."""
        done = 0
        for _ in range(BATCHES_PER_PASS):
            redis = engine.redis
            if redis is None or engine.redis_tier is None or not redis.up:
                return done
            with self._lock:
                batch = [self._queue.popleft() for _ in range(min(self._batch, len(self._queue)))]
            if not batch:
                return done
            try:
                written, failed = self._share(engine, batch)
            except BackendUnavailable:  # the tier went down meanwhile
                written, failed = 0, len(batch)
                with self._lock:
                    self._failed += failed
            done += written
            if failed:
                return done  # a shard is down: the rest waits for the next pass
        return done

    def _share(self, engine: TierEngine, batch: list[PageId]) -> tuple[int, int]:
        redis, t = engine.redis, engine.redis_tier
        assert redis is not None and t is not None
        picked = engine.in_memory(batch)
        if not picked:
            return 0, 0
        there = redis.fetch([h.page for h in picked], blobs=False)
        todo = []
        present = 0
        for held, got in zip(picked, there, strict=True):
            if isinstance(got, Found):
                present += 1
                continue
            try:
                stored, prec = engine.converter.to_tier(held.data, engine.specs[t])
            except CorruptPage:
                continue  # a lent page its client changed: the demotion will drop it
            blob = blob_of(stored)
            todo.append((held.page, blob, RemoteMeta(min(held.precision, prec), held.nbytes,
                                                     len(blob), held.chain_position)))
        results = redis.write_many(todo) if todo else []
        tokens = [(pid, r) for (pid, _, _), r in zip(todo, results, strict=True)
                  if isinstance(r, str)]
        unknown = set(engine.unknown(pid for pid, _ in tokens))
        gone = [(pid, tok) for pid, tok in tokens if pid in unknown]
        if gone:
            redis.delete_if(gone)  # deleted while its copy was written
        failed = len(results) - len(tokens)
        with self._lock:
            self._shared += len(tokens) - len(gone)
            self._present += present
            self._failed += failed
        return len(tokens) - len(gone), failed
