"""Lent pages: a put whose shm bytes the daemon keeps as the pages, with no copy.

A client that opts in (``shm_ring_slots`` on its puts, see ``cache.proto``) lends the ranges of
its segment that hold a put's pages. The daemon checks them where they lie and the store
adopts them as they are, so a shared-memory put costs the client's copy into its segment and
nothing more. Each range comes back to the client once the daemon no longer uses it (the page
left the hot tier, was deleted, or was not stored at all), while the session lasts: a finalizer
on the range's array appends its offset to the session's return ring::

    40          48          ring offset      (kvtier_client.shm_layout)
    | head u64  | tail u64  | ... | slots x u64 offsets (written by the daemon) |

``head`` counts the offsets the daemon appended, ``tail`` those the client took back; an
offset is written before ``head`` moves (x86-64 keeps stores in order). When the ring is full
the daemon keeps the offsets and appends them at the next chance. Ranges lent (or handed back)
and not yet in the ring are bounded by the ring's slots (:meth:`ReturnRing.check_lend`), so a
client that never takes ranges back cannot make the daemon hold ever more of them; the client
library never lends more ranges than its ring holds.

A lending put that fails still returns every range it named: those already lent when their
arrays die, the others at once (:meth:`ReturnRing.hand_back`), and says so with the trailing
metadata ``RANGES_BACK``; the client then keeps its segment. Only a put that failed before the
daemon could use the session's ring gets no such promise, and its client starts a new segment.

The trade: a client that writes to a range it lent changes its own page in the hot tier (its
namespace only; the session is bound to it). A page made non-finite that way is dropped as
corrupt when it is demoted. When the client's lend area is full (``shm_reclaim``) or its session
ends, the daemon copies the pages still lent into its own memory
(:mod:`kvtier.transport.shm.relocate`), so ranges come back and an ended session's segment is
unmapped soon after, not when the last of those pages leaves the hot tier.
"""

from __future__ import annotations

import mmap
import struct
import threading
import weakref
from collections import deque

import numpy as np

from kvtier.errors import CapacityExhausted, InvalidArgument
from kvtier.types import PageId
from kvtier_client.shm_layout import RING_HEAD_OFFSET, RING_TAIL_OFFSET



class ReturnRing:
    """Where one session's lent ranges go back to its client.

    :meth:`give_back` is a finalizer: it can run in any thread, at any allocation (the cyclic
    GC), also while this thread already holds the ring's lock or the store's. So it only
    appends to a deque (atomic) and then flushes if the lock is free; a flush that finds it
    taken leaves the offsets to the flush in progress or to the session's next call.
    """

    def __init__(self, mm: mmap.mmap, offset: int, slots: int, closed: threading.Event) -> None:
        self._mm = mm
        self.offset, self.slots = offset, slots
        self._closed = closed
        self._lock = threading.Lock()
        self._pending: deque[int] = deque()
        self._head = 0
        self._lent = 0  # ranges lent or handed back so far; _head of them are in the ring
        self._live: set[int] = set()  # offsets lent and not yet given back
        self._stored: dict[int, PageId] = {}  # offset -> the page kept there (for copy-out)

    def matches(self, offset: int, slots: int) -> None:
        if (offset, slots) != (self.offset, self.slots):
            raise InvalidArgument(
                f"the return ring is at {self.offset} with {self.slots} slots for this session, "
                f"not at {offset} with {slots}", field="shm_ring_offset")

    def outstanding(self) -> int:
        """Ranges lent or handed back whose offsets are not in the ring yet: live lent pages
        plus the offsets held back while the ring is full. At most ``slots``, so a client that
        never takes ranges back cannot make the daemon hold more and more."""
        return self._lent - self._head

    def check_lend(self, ranges: list[tuple[int, int]]) -> None:
        """Refuse to lend ``ranges`` ((offset, length) each) unless all can be: RESOURCE_EXHAUSTED
        if :meth:`outstanding` would pass the ring's slots (a well-behaved client lends no more
        than its ring holds), INVALID_ARGUMENT if two overlap or one is lent already (it would
        come back twice, and the client would write over a page still kept)."""
        n = len(ranges)
        if self.outstanding() + n > self.slots:
            raise CapacityExhausted(
                f"{self.outstanding()} lent ranges not yet back in a return ring of "
                f"{self.slots} slots; {n} more do not fit (take back the returned ones)",
                field="shm_ring_slots")
        end = -1
        for off, length in sorted(ranges):
            if off < end or off in self._live:
                raise InvalidArgument(f"shm range at {off} overlaps another lent range",
                                      field="shm_offset")
            end = off + length

    def lend(self, offset: int, n: int) -> np.ndarray:
        """``n`` bytes at ``offset`` as an array kept as a page; its range comes back when the
        array dies (its pages and every view of them)."""
        arr = np.frombuffer(self._mm, np.uint8, n, offset)
        self._lent += 1
        self._live.add(offset)
        weakref.finalize(arr, self.give_back, offset)
        return arr

    def hand_back(self, offsets: list[int]) -> bool:
        """Return ranges that were never lent (their put failed first), if the ring has room
        for them under the :meth:`outstanding` bound and none of them is lent by another put;
        False (nothing returned) if not."""
        if self.outstanding() + len(offsets) > self.slots or not self._live.isdisjoint(offsets):
            return False  # a lent one would come back twice: the client starts a new segment
        self._lent += len(offsets)
        for offset in offsets:
            self.give_back(offset)
        return True

    def note_stored(self, offset: int, pid: PageId) -> None:
        """The page ``pid`` was stored from the range at ``offset``: a copy-out looks there."""
        self._stored[offset] = pid
        if offset not in self._live:  # its page died already
            self._stored.pop(offset, None)

    def stored(self) -> list[PageId]:
        """The pages kept in lent ranges, oldest first (some may have moved on meanwhile)."""
        return list(self._stored.copy().values())

    def give_back(self, offset: int) -> None:
        self._live.discard(offset)  # atomic, like the pop: safe in a finalizer
        self._stored.pop(offset, None)
        if not self._closed.is_set():
            self._pending.append(offset)
            self.flush()

    def flush(self) -> None:
        """Append what the ring has room for; never waits."""
        if not self._pending or not self._lock.acquire(blocking=False):
            return
        try:
            if self._closed.is_set():
                self._pending.clear()
                return
            (tail,) = struct.unpack_from("<Q", self._mm, RING_TAIL_OFFSET)
            while self._pending and self._head - tail < self.slots:
                at = self.offset + 8 * (self._head % self.slots)
                struct.pack_into("<Q", self._mm, at, self._pending.popleft())
                self._head += 1
            struct.pack_into("<Q", self._mm, RING_HEAD_OFFSET, self._head)
        except ValueError:  # the segment was unmapped meanwhile: nobody to tell
            self._pending.clear()
        finally:
            self._lock.release()
