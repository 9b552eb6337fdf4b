"""Copying lent pages out of a client's segment, so its ranges come back while the pages stay.

A lent page (:mod:`kvtier.transport.shm.lend`) keeps its range of the client's lend area for as
long as it stays in a memory tier uncompressed. Two things call for the daemon to give such pages
memory of their own instead, after which their ranges go back through the return ring:

- the client's lend area is full (``PutRequest.shm_reclaim``): puts would copy from then on,
  so the daemon copies the pages kept there now, off the calls' path, and puts lend again;
- the session ended (the client closed it or died): the segment then stays mapped only while
  such pages live, and counts against the session limit until they are gone.

:class:`Relocator` does this in a thread of its own, one session at a time, and the thread ends
when nothing is left to do. Each page is copied into a buffer of the daemon's
:class:`~kvtier.store.buffers.BufferPool`, checked for NaN/Inf there (a client that wrote into a
range it lent loses that page, dropped as corrupt), and swapped in only if the tier still holds
the lent page (``TierStore.copy_out_lent``): a page demoted, deleted or read meanwhile is safe.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from kvtier.errors import InvalidArgument
from kvtier.finite import check_finite
from kvtier.pages import dtype_name
from kvtier.store.buffers import BufferPool
from kvtier.store.store import TierStore
from kvtier.transport.shm.session import ShmSession
from kvtier.types import Page

log = logging.getLogger(__name__)


def owned_copy(page: Page, buffers: BufferPool) -> Page | None:
    """``page`` copied into one buffer of ``buffers`` (k's bytes, then v's), or None if it
    holds NaN/Inf."""
    n = page.k.numel() * page.k.element_size()
    buf = buffers.take(2 * n)
    kv = buf.view(page.k.dtype).view(2, *page.k.shape)
    kv[0].copy_(page.k)
    kv[1].copy_(page.v)
    arr = buf.numpy()
    try:
        check_finite(arr.data, dtype_name(page.k.dtype), "k")
    except InvalidArgument:
        return None
    k, v = kv.unbind(0)
    return Page(k, v, page.start_position)


class Relocator:
    """Copies the pages lent from a session's segment into the daemon's memory, in the
    background (see the module docstring). Thread-safe; :meth:`submit` never waits.

    A live session is copied out at most once per ``min_interval_s`` (any client may ask on
    every put, and each job looks up every page the session lent). For an ended session the
    job repeats, a little later, until its segment could be unmapped (a put still in flight, a
    page mid-move or a reader may hold a lent page for a moment), at most ``ENDED_TRIES``
    times.
    """

    ENDED_TRIES = 20
    RETRY_S = 0.05

    def __init__(self, store: TierStore, buffers: BufferPool, min_interval_s: float = 0.1) -> None:
        self._store = store
        self._buffers = buffers
        self._min_interval_s = min_interval_s
        self._lock = threading.Lock()
        self._queue: deque[ShmSession] = deque()
        self._queued: set[str] = set()
        self._last: dict[str, float] = {}  # live sessions: when their last job ran
        self._thread: threading.Thread | None = None
        self._closed = False
        self.pages_moved = 0
        self.jobs_done = 0

    def submit(self, session: ShmSession) -> None:
        """Copy out the pages ``session``'s client lent (once, if it is queued already)."""
        now = time.monotonic()
        with self._lock:
            if self._closed or session.session_id in self._queued:
                return
            if not session.ended.is_set() and \
                    now - self._last.get(session.session_id, -1e9) < self._min_interval_s:
                return
            self._queued.add(session.session_id)
            self._queue.append(session)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kvtier-relocate",
                                                daemon=True)
                self._thread.start()

    def idle(self) -> bool:
        with self._lock:
            return self._thread is None

    def close(self, timeout_s: float = 5.0) -> None:
        """Take no more jobs and wait for the one in progress (before the store closes)."""
        with self._lock:
            self._closed = True
            self._queue.clear()
            self._queued.clear()
            thread = self._thread
        if thread is not None:
            thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._queue or self._closed:
                    self._thread = None
                    return
                session = self._queue.popleft()
                self._queued.discard(session.session_id)
                if session.ended.is_set():
                    self._last.pop(session.session_id, None)
                else:
                    self._last[session.session_id] = time.monotonic()
            try:
                moved = self._job(session)
            except Exception:  # noqa: BLE001 - a bug here must not stop later jobs
                log.exception("copying out the pages lent from shm session %s failed",
                              session.session_id)
                continue
            with self._lock:
                self.pages_moved += moved
                self.jobs_done += 1

    def _job(self, session: ShmSession) -> int:
        moved = self.relocate(session)
        for _ in range(self.ENDED_TRIES if session.ended.is_set() else 0):
            if session.unmap() or self._closed:
                break
            time.sleep(self.RETRY_S)
            moved += self.relocate(session)
        return moved

    def relocate(self, session: ShmSession) -> int:
        """Copy out now, in this thread; returns how many pages moved."""
        lo = session.base
        moved = self._store.copy_out_lent(session.lent_pages(), lo, lo + session.size,
                                          lambda page: owned_copy(page, self._buffers))
        if moved:
            log.debug("shm session %s: %d lent pages copied out", session.session_id, moved)
        return moved
