"""Replacement cores behind the store's :class:`~kvtier.store.policy.Policy` interface.

The store owns residency and capacity; the core keeps its ordering state (queues, ghosts,
frequencies) from the access events the store reports, and ``victims()`` ranks exactly the
candidates the store offers by the core's own eviction preference. A candidate the core has not
heard of yet (its events are still queued) is added first, in access order, so a freshly put
page is never mistaken for the coldest one. Thread-safe: the mover and the event delivery may
call in from different threads.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from typing import ClassVar

from kvtier.policy.classic import ARCCore, S3FIFOCore
from kvtier.policy.core import ReplacementCore
from kvtier.store.policy import AccessEvent, AccessKind, PageMeta, Policy, PolicyStatus
from kvtier.types import PageId

# Accesses that touch a page's data; LOOKUP only asks whether it is there.
DATA_ACCESSES = frozenset({AccessKind.GET, AccessKind.PUT, AccessKind.PROMOTE})


class CorePolicy(Policy):
    """A :class:`ReplacementCore` (ARC, S3-FIFO, ...) as a live store policy."""

    core_type: ClassVar[type[ReplacementCore]]

    def __init__(self) -> None:
        self._core = self.core_type(sys.maxsize)  # the store decides capacity; core only ranks
        self._lock = threading.Lock()

    def record(self, events: Sequence[AccessEvent]) -> None:
        with self._lock:
            core = self._core
            for ev in events:
                if ev.kind not in DATA_ACCESSES or (ev.kind is AccessKind.GET
                                                    and ev.tier_hit is None):
                    continue
                if ev.page in core:
                    core.hit(ev.page)
                else:
                    core.insert(ev.page)

    def forget(self, pages: Sequence[PageId]) -> None:
        with self._lock:
            for p in pages:
                self._core.remove(p)

    def _ranked(self, candidates: Sequence[PageMeta]) -> list[PageMeta]:
        core = self._core
        for meta in sorted((m for m in candidates if m.page not in core),
                           key=lambda m: m.last_seq):
            core.insert(meta.page)
        return sorted(candidates, key=lambda m: (core.evict_key(m.page), m.last_seq, m.page))

    def victims(self, candidates: Sequence[PageMeta], n: int) -> list[PageId]:
        if n <= 0 or not candidates:
            return []
        with self._lock:
            return [m.page for m in self._ranked(candidates)[:n]]

    def score(self, pages: Sequence[PageMeta]) -> list[float]:
        """Rank within ``pages`` (0 = first to go), so scores agree with ``victims``."""
        with self._lock:
            order = self._ranked(pages)
        rank = {m.page: float(i) for i, m in enumerate(order)}
        return [rank[m.page] for m in pages]

    def status(self) -> PolicyStatus:
        return PolicyStatus(name=self.name, active=self.name, fallback_active=False)


class ARCPolicy(CorePolicy):
    name = "arc"
    core_type = ARCCore


class S3FIFOPolicy(CorePolicy):
    name = "s3fifo"
    core_type = S3FIFOCore
