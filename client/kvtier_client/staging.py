"""Staging buffers: page tensors that live in the client's shared-memory segment.

A worker that has to write its KV cache into host memory anyway (a copy out of the GPU, or out
of its paged KV pool) can write it straight into the segment: :meth:`KVTierClient.staged_page`
hands out a :class:`~kvtier_client.tensors.Page` whose ``k`` and ``v`` are numpy arrays inside
the segment's staging area, and ``put`` of such a page sends only its offset, with no client
copy. Without a session (shared memory off, remote daemon, full staging area) the arrays are
ordinary ones and ``put`` works as always.

The client's areas of the segment (after the fixed words of :mod:`kvtier_client.shm_layout`),
with a staging area (``staging_bytes`` at the client)::

    DATA_OFFSET              request_end                                              size
    | request area: put      | lend area | return | staging slots:                      |
    | copies, get replies    | (opt.)    | ring   | k|v per page                         |

The daemon cannot tell staging slots from the request area; it reads a put page at the offset
the client names and writes get replies only into ``[DATA_OFFSET, request_end)``.

A staged page is the caller's memory, refilled at will between puts. A put that raised (a
deadline, a cancel) may still be read late by the daemon; the client then moves the segment's
fill number on (``Session.void_fill``, with a fence) before it raises, and the daemon, which
checks that number after reading a put's bytes (``kvtier.transport.shm.copy``), stores nothing
for such a put, so a page refilled afterwards is never stored under the failed put's keys.
That rests on stores becoming visible in order (x86-64, ``OVERLAP_SAFE``); on other hosts,
release a page whose put raised rather than refill it.
"""

from __future__ import annotations

import bisect
import math
import threading
from typing import Any

import numpy as np

from kvtier_client.tensors import Page

_NUMPY: dict[str, np.dtype[Any]] = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}


class StagingArea:
    """First-fit allocator over ``[start, end)`` of a segment; offsets 64-byte aligned."""

    def __init__(self, start: int, end: int, align: int = 64) -> None:
        self._align = align
        self.capacity = max(0, end - start)
        self._free: list[tuple[int, int]] = [(start, end - start)] if end > start else []
        self._used: dict[int, int] = {}
        self._lock = threading.Lock()

    def alloc(self, n: int) -> int | None:
        """Offset of ``n`` (> 0) fresh bytes, or None when no free run is long enough."""
        if n <= 0:
            raise ValueError(f"an allocation needs at least one byte, not {n}")
        n = -(-n // self._align) * self._align
        with self._lock:
            for i, (off, size) in enumerate(self._free):
                if size >= n:
                    if size == n:
                        del self._free[i]
                    else:
                        self._free[i] = (off + n, size - n)
                    self._used[off] = n
                    return off
        return None

    def free(self, off: int) -> None:
        """Give back the run at ``off``; ValueError if it is not allocated."""
        with self._lock:
            n = self._used.pop(off, None)
            if n is None:
                raise ValueError("not a staged page of this client, or released already")
            i = bisect.bisect(self._free, (off, n))
            self._free.insert(i, (off, n))
            # merge with the next and the previous free run
            if i + 1 < len(self._free) and off + n == self._free[i + 1][0]:
                n += self._free.pop(i + 1)[1]
                self._free[i] = (off, n)
            if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == off:
                prev = self._free.pop(i - 1)
                self._free[i - 1] = (prev[0], prev[1] + n)

    @property
    def count(self) -> int:
        """Runs allocated and not freed."""
        return len(self._used)

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(self._used.values())


def page_dtype(dtype: str) -> np.dtype[Any]:
    try:
        return _NUMPY[dtype]
    except KeyError:
        raise ValueError(f"staged pages are float16 or float32, not {dtype!r}") from None


def new_page(segment: Any, shape: tuple[int, ...], dtype: str, start_position: int) -> Page:
    """A page of ``shape``/``dtype`` in ``segment``'s staging area when it has room (``segment``
    None: no session), else in ordinary memory."""
    dt = page_dtype(dtype)
    shape = tuple(int(s) for s in shape)
    n = dt.itemsize * math.prod(shape)
    off = segment.staging.alloc(2 * n) if segment is not None and n > 0 else None
    if off is None:
        return Page(np.empty(shape, dt), np.empty(shape, dt), start_position)
    buf = segment.array(off, 2 * n)
    return Page(buf[:n].view(dt).reshape(shape), buf[n:].view(dt).reshape(shape),
                start_position)


def release_page(session: Any, page: Page) -> None:
    """Free ``page``'s slot if it lies in ``session``'s staging area (else nothing to do:
    ordinary memory, or a segment of an ended session, freed with its last page)."""
    if session is None or not isinstance(page.k, np.ndarray):
        return
    off = session.segment.staged_offset(page.k.reshape(-1).view(np.uint8).data)
    if off is not None:
        session.segment.staging.free(off)
