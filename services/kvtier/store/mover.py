"""When pages move: the background mover's thread and the rules it applies, never how a page
moves (that is :mod:`kvtier.store.transfer`).

:func:`rebalance_tier` is the watermark rule: a tier past its high watermark pushes the policy's
lowest-scored pages one tier down (or out of the last tier, reason ``capacity``) until it is at
its low watermark. Above a Redis tier that is down, pages wait (nothing moves) — the hard limit
is enforced by the synchronous make-room path, which evicts with reason ``remote_down``.
:func:`prefetch_pass` then promotes what the policy expects to be used soon into spare room.
:func:`relocate` is the same move asked for by a call (promote, admin demote), for one page.
:class:`Prefetcher` promotes what workers announce (a lookup's prefetch flag, queued requests'
prefixes) on its own thread, as soon as they announce it.

It wakes every ``interval_s`` or when :meth:`Mover.wake` is called (a put pushed a tier past
its high watermark). A pass that raises is logged and the thread carries on: nothing raises out
of the mover and nothing stops it but :meth:`Mover.stop`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from kvtier.store import transfer
from kvtier.store.engine import TierEngine
from kvtier.store.transfer import MoveResult
from kvtier.types import PageId

log = logging.getLogger(__name__)


class Mover:
    def __init__(self, work: Callable[[], None], interval_s: float,
                 name: str = "kvtier-mover") -> None:
        self._work = work
        self._interval_s = interval_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.passes = 0
        self.failures = 0

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop after the pass in progress; waits up to ``timeout_s`` for the thread."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._interval_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self._work()
            except Exception:
                self.failures += 1
                log.exception("mover pass failed; retrying next interval")
            self.passes += 1


def rebalance_tier(engine: TierEngine, tier: int) -> int:
    """If ``tier`` is past its high watermark, push victims down to its low watermark."""
    candidates = engine.over_high(tier)
    if candidates is None:
        return 0
    if not engine.tier_up(tier) or (tier != engine.last and not engine.tier_up(tier + 1)):
        return 0  # wait here for Redis, up to the hard limit (see transfer.push_down)
    done = 0
    for pid in engine.victims(candidates):
        if engine.at_or_below_low(tier):
            break
        done += transfer.push_down(engine, pid, tier, evict_if_down=False)
        if tier != engine.last and not engine.tier_up(tier + 1):
            break
    return done


def prefetch_pass(engine: TierEngine, limit: int) -> int:
    """Promote the policy's prefetch picks into the top tier, only while it has spare room.

    A pick moves up only if the top tier stays at or below its low watermark afterwards, so a
    prefetch never pushes other pages down (no thrash). Returns the number promoted.
    """
    try:
        picks = engine.policy.prefetch(limit)
    except Exception:
        log.exception("policy %s failed in prefetch(); skipping", engine.policy.name)
        return 0
    done = 0
    for pid in picks[:limit]:
        fits = engine.prefetch_fits(pid)
        if fits is None:
            continue
        if not fits:
            break
        done += transfer.move(engine, pid, 0) is MoveResult.MOVED
    return done


def relocate(engine: TierEngine, pid: PageId, target: int, *, upward: bool) -> bool:
    """Promote (``upward``) a page to at least ``target``, or demote it to exactly it.

    Waits (bounded) while the page is mid-move or mid-put. False if it is absent, cannot
    get there (no room, Redis down), or a demotion would have to go up.
    """
    deadline = time.monotonic() + engine.room_timeout_s
    while True:
        where = engine.residence(pid)
        if where is None:
            return False
        tier, resident = where
        if resident and (tier == target or (upward and tier < target)):
            return True
        if resident and not upward and tier > target:
            return False
        if resident:
            result = transfer.move(engine, pid, target)
            if result is MoveResult.MOVED:
                return True
            if result is not MoveResult.BUSY:
                return False
        if time.monotonic() >= deadline:
            return False
        engine.wait_for_change()


class Prefetcher:
    """Promotions asked for ahead of use (a lookup's ``prefetch``, queue hints), done off the
    caller's path, and what they were worth.

    :meth:`submit` queues pages (bounded: the oldest requests go first when it is full) and
    wakes the prefetch thread; :meth:`run` promotes each still-lower-tier page into the top
    tier (making room there the usual way: the policy's victims, with queued pages kept), and
    remembers what it promoted, so that :meth:`note_reads` can count the gets that found a page
    in the top tier because of it (``hits``).
    """

    def __init__(self, engine: TierEngine, max_pending: int = 1 << 14,
                 max_tracked: int = 1 << 16) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._pending: OrderedDict[PageId, None] = OrderedDict()
        self._promoted: OrderedDict[PageId, None] = OrderedDict()
        self._max_pending = max_pending
        self._max_tracked = max_tracked
        self._thread: Mover | None = None
        self.promoted = 0
        self.hits = 0
        self.dropped = 0

    def start(self, interval_s: float) -> None:
        if self._thread is None:
            self._thread = Mover(lambda: None if self.run() else None, interval_s,
                                 name="kvtier-prefetch")
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._thread.stop()
            self._thread = None

    def submit(self, pids: Sequence[PageId]) -> int:
        """Queue the pages of ``pids`` that lie below the top tier; how many were queued."""
        todo = []
        for pid in pids:
            where = self._engine.residence(pid)
            if where is not None and where[0] > 0:
                todo.append(pid)
        if not todo:
            return 0
        with self._lock:
            for pid in todo:
                self._pending[pid] = None
                self._pending.move_to_end(pid)
            while len(self._pending) > self._max_pending:
                self._pending.popitem(last=False)
                self.dropped += 1
        if self._thread is not None:
            self._thread.wake()
        return len(todo)

    def run(self) -> int:
        """Promote every pending page (the prefetch thread's pass); the number promoted."""
        done = 0
        while True:
            with self._lock:
                if not self._pending:
                    return done
                pid = self._pending.popitem(last=False)[0]
            where = self._engine.residence(pid)
            if where is None or where[0] == 0:
                continue
            if transfer.move(self._engine, pid, 0) is MoveResult.MOVED:
                done += 1
                with self._lock:
                    self.promoted += 1
                    self._promoted[pid] = None
                    while len(self._promoted) > self._max_tracked:
                        self._promoted.popitem(last=False)

    def note_reads(self, pids: Sequence[PageId], tiers: Sequence[int | None]) -> None:
        """Gets of ``pids`` served from ``tiers``: count top-tier hits on promoted pages."""
        with self._lock:
            if not self._promoted:
                return
            for pid, t in zip(pids, tiers, strict=True):
                if pid in self._promoted:
                    del self._promoted[pid]
                    self.hits += t == 0
