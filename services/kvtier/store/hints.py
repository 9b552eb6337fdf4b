"""Worker hints: what a serving engine knows ahead of the cache, kept for the store's rankings.

Every hint is optional and advisory; without any, rankings are the policy's alone.

- **queue**: per namespace, the prefix chains of the requests waiting to be scheduled (a
  :meth:`HintBook.set_queue` replaces that namespace's previous queue). Their pages are kept
  (ranked last for demotion and eviction) and their present prefixes promoted ahead of use.
- **sessions**: the session a lookup or put names is remembered per page (the latest one that
  used it); pages whose latest session has ended go first. An ended session that is used again
  is live again.
- **expected reuse** (per put): the page is kept until twice that long after the put (an
  estimate is an estimate), then ranks as the policy says.

Pure metadata, thread-safe (its own small lock); bounded (the oldest page records go first).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence

from kvtier.types import PageId

MAX_PAGES = 1 << 20
"""Page records (session, expected reuse) kept at most."""

MAX_ENDED = 1 << 16
"""Ended sessions remembered at most (the oldest are forgotten first)."""

GRACE = 2.0
"""A page with an expected reuse time is kept until GRACE x that time after its put."""


class HintBook:
    """Queue, session and expected-reuse hints (module docstring)."""

    def __init__(self, max_pages: int = MAX_PAGES) -> None:
        self._lock = threading.Lock()
        self._max_pages = max_pages
        self._queues: dict[str, frozenset[PageId]] = {}
        self._queued: frozenset[PageId] = frozenset()
        self._session: OrderedDict[PageId, str] = OrderedDict()
        self._keep_until: OrderedDict[PageId, float] = OrderedDict()
        self._ended: OrderedDict[str, None] = OrderedDict()

    def set_queue(self, namespace: str, chains: Sequence[Sequence[PageId]]) -> None:
        pages = frozenset(p for chain in chains for p in chain)
        with self._lock:
            if pages:
                self._queues[namespace] = pages
            else:
                self._queues.pop(namespace, None)
            self._queued = frozenset().union(*self._queues.values()) if self._queues \
                else frozenset()

    def end_sessions(self, namespace: str, sessions: Iterable[str]) -> None:
        with self._lock:
            for s in sessions:
                self._ended[f"{namespace}\0{s}"] = None
                self._ended.move_to_end(f"{namespace}\0{s}")
            while len(self._ended) > MAX_ENDED:
                self._ended.popitem(last=False)

    def used(self, pids: Sequence[PageId], session: str) -> None:
        """``pids`` were used (looked up or put) by ``session``."""
        if not session or not pids:
            return
        name = f"{pids[0].namespace}\0{session}"
        with self._lock:
            self._ended.pop(name, None)
            for p in pids:
                self._session[p] = name
                self._session.move_to_end(p)
            while len(self._session) > self._max_pages:
                self._session.popitem(last=False)

    def expect_reuse(self, pids: Sequence[PageId], seconds: Sequence[float | None],
                     now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._lock:
            for p, s in zip(pids, seconds, strict=True):
                if s is not None and s > 0:
                    self._keep_until[p] = now + GRACE * s
                    self._keep_until.move_to_end(p)
            while len(self._keep_until) > self._max_pages:
                self._keep_until.popitem(last=False)

    def queued(self) -> frozenset[PageId]:
        with self._lock:
            return self._queued

    def classes(self, pids: Sequence[PageId], now: float | None = None) -> list[int]:
        """Per page: 0 = its session ended (goes first), 1 = no hint, 2 = expected back soon
        (kept), 3 = queued (kept longest)."""
        now = time.time() if now is None else now
        with self._lock:
            if not (self._queued or self._ended or self._keep_until):
                return [1] * len(pids)
            out = []
            for p in pids:
                if p in self._queued:
                    out.append(3)
                    continue
                until = self._keep_until.get(p)
                if until is not None:
                    if until > now:
                        out.append(2)
                        continue
                    del self._keep_until[p]
                s = self._session.get(p)
                out.append(0 if s is not None and s in self._ended else 1)
            return out

    def forget(self, pids: Iterable[PageId]) -> None:
        with self._lock:
            for p in pids:
                self._session.pop(p, None)
                self._keep_until.pop(p, None)
