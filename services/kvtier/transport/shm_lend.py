"""Lent pages: a put whose shm bytes the daemon keeps as the pages, with no copy.

A client that opts in (``shm_ring_slots`` on its puts, see ``cache.proto``) lends the ranges of
its segment that hold a put's pages. The daemon checks them where they lie and the store
adopts them as they are, so a shared-memory put costs the client's copy into its segment and
nothing more. Each range comes back to the client once the daemon no longer uses it (the page
left the hot tier, was deleted, or was not stored at all), while the session lasts: a finalizer
on the range's array appends its offset to the session's return ring::

    40          48          ring offset
    | head u64  | tail u64  | ... | slots x u64 offsets (written by the daemon) |

``head`` counts the offsets the daemon appended, ``tail`` those the client took back; an
offset is written before ``head`` moves (x86-64 keeps stores in order). When the ring is full
the daemon keeps the offsets and appends them at the next chance.

The trade: a client that writes to a range it lent changes its own page in the hot tier (its
namespace only; the session is bound to it). A page made non-finite that way is dropped as
corrupt when it is demoted. Lent ranges keep the segment mapped in the daemon after the session
ends, until the last of those pages is gone.
"""

from __future__ import annotations

import mmap
import struct
import threading
import weakref
from collections import deque

import numpy as np

from kvtier.errors import InvalidArgument

HEAD_OFFSET = 40
TAIL_OFFSET = 48
MAX_SLOTS = 1 << 20


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

    def matches(self, offset: int, slots: int) -> None:
        if (offset, slots) != (self.offset, self.slots):
            raise InvalidArgument(
                f"the return ring is at {self.offset} with {self.slots} slots for this session, "
                f"not at {offset} with {slots}", field="shm_ring_offset")

    def lend(self, offset: int, n: int) -> np.ndarray:
        """``n`` bytes at ``offset`` as an array kept as a page; its range comes back when the
        array dies (its pages and every view of them)."""
        arr = np.frombuffer(self._mm, np.uint8, n, offset)
        weakref.finalize(arr, self.give_back, offset)
        return arr

    def give_back(self, offset: int) -> None:
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
            (tail,) = struct.unpack_from("<Q", self._mm, TAIL_OFFSET)
            while self._pending and self._head - tail < self.slots:
                at = self.offset + 8 * (self._head % self.slots)
                struct.pack_into("<Q", self._mm, at, self._pending.popleft())
                self._head += 1
            struct.pack_into("<Q", self._mm, HEAD_OFFSET, self._head)
        except ValueError:  # the segment was unmapped meanwhile: nobody to tell
            self._pending.clear()
        finally:
            self._lock.release()
