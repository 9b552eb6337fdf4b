"""When pages move: the background mover's thread and the rules it applies, never how a page
moves (that is :mod:`kvtier.store.transfer`).

:func:`rebalance_tier` is the watermark rule: a tier past its high watermark pushes the policy's
lowest-scored pages one tier down (or out of the last tier, reason ``capacity``) until it is at
its low watermark. Above a Redis tier that is down, pages wait (nothing moves) — the hard limit
is enforced by the synchronous make-room path, which evicts with reason ``remote_down``.
:func:`prefetch_pass` then promotes what the policy expects to be used soon into spare room.
:func:`relocate` is the same move asked for by a call (promote, admin demote), for one page.

It wakes every ``interval_s`` or when :meth:`Mover.wake` is called (a put pushed a tier past
its high watermark). A pass that raises is logged and the thread carries on: nothing raises out
of the mover and nothing stops it but :meth:`Mover.stop`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

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
