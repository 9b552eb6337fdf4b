"""Copying a put's pages out of a client's shared-memory segment into memory the daemon owns.

A put names where each page's k and v lie in the session's segment (``shm_offset``). Unless
the client lends them (:func:`lent_pages`, :mod:`kvtier.transport.shm.lend`) the daemon keeps
no view of that memory: each page is copied once into a buffer (from the daemon's
:class:`~kvtier.store.buffers.BufferPool`: memory already faulted in) that the store then
adopts (``TierStore.put_checked(owned=True)``), and the NaN/Inf check runs on that copy, so what was
checked is what is kept, whatever the client writes into its segment afterwards.

With ``shm_fill`` (see ``cache.proto``) the client is still writing while the call starts. The
batch's shm bytes form one stream, page 0 k, page 0 v, page 1 k, ..., and the client publishes
in the segment's fill words how much of that stream is written::

    16                 24                       32
    | fill number (u64) | bytes written (u64)   |

The daemon copies each part as soon as it is written (:func:`follow_fill`), so the client's
copy and the daemon's overlap instead of adding up; for lent pages it checks each part where it
lies, and the client's copy hides behind the start of the call. The client uses this only on
x86-64, whose stores become visible in program order: a count seen by the daemon implies the
bytes before it are visible too.

The fill number is also the segment's generation: a client sets it before it writes a put's
bytes (overlapped or not), and the daemon checks it before and after its copy. So a daemon
still busy with a put the client gave up on (deadline, cancel) notices that the client reused
the segment, and that put is ABORTED and stores nothing, instead of storing the next put's
bytes under its keys. If the bytes do not arrive within the call's deadline (``FILL_TIMEOUT_S``
for a call without one) the put is ABORTED; if the session ends meanwhile,
FAILED_PRECONDITION. The wait is the call's own deadline, not shorter: a client stalled for a
while (a long call holding its GIL, a full garbage collection) gets its put stored late, as it
would have with its bytes copied before the call, rather than an error.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import cast

import numpy as np
import torch

from kvtier.errors import Aborted, Conflict, InvalidArgument
from kvtier.finite import check_finite
from kvtier.pages import PageHeader, page_of_buffer
from kvtier.store.buffers import BufferPool
from kvtier.transport.shm.lend import ReturnRing
from kvtier.types import Page
from kvtier_client.shm_layout import FILL_OFFSET

FILL_TIMEOUT_S = 30.0  # how long a put without a deadline waits for its bytes
_SPINS = 64  # polls before the waiting thread starts yielding the GIL
_YIELDS = 4000  # then sleep(0) polls before it sleeps 100 us between polls


def copy_pages(seg: memoryview, headers: Sequence[PageHeader], fill: int, ended: threading.Event,
               buffers: BufferPool, timeout_s: float = FILL_TIMEOUT_S) -> list[Page]:
    """The pages of ``headers`` (each with its checked ``shm_offset``), copied out of ``seg``.

    ``fill`` 0: the bytes are all in place. Otherwise follow the fill words as described above.
    Raises InvalidArgument for NaN/Inf (naming k or v), Aborted as described above.
    """
    src = np.frombuffer(seg, np.uint8)
    bufs = [buffers.take(2 * h.nbytes) for h in headers]
    dsts = [buf.numpy() for buf in bufs]  # a page's k then v, as in the segment

    def copy(i: int, a: int, b: int) -> None:
        off = cast(int, headers[i].shm_offset)
        dsts[i][a:b] = src[off + a:off + b]
        _check(dsts[i], a, b, headers[i])

    follow_fill(seg, [d.size for d in dsts], fill, ended, timeout_s, copy)
    return [page_of_buffer(h, buf) for h, buf in zip(headers, bufs)]


def lent_pages(seg: memoryview, ring: ReturnRing, headers: Sequence[PageHeader], fill: int,
               ended: threading.Event, timeout_s: float = FILL_TIMEOUT_S) -> list[Page]:
    """The pages of ``headers`` where they lie in the segment, lent (see
    :mod:`kvtier.transport.shm.lend`) and checked for NaN/Inf there, each part as soon as the
    client wrote it (``fill``, as for :func:`copy_pages`). ``seg`` is in use (the session
    cannot close meanwhile); every range goes back through ``ring`` when its page dies, also
    when this raises."""
    arrays = [ring.lend(cast(int, h.shm_offset), 2 * h.nbytes) for h in headers]
    # all are lent first: on an error all come back
    follow_fill(seg, [a.size for a in arrays], fill, ended, timeout_s,
                lambda i, a, b: _check(arrays[i], a, b, headers[i]))
    return [page_of_buffer(h, torch.from_numpy(arr)) for h, arr in zip(headers, arrays)]


def follow_fill(seg: memoryview, sizes: Sequence[int], fill: int, ended: threading.Event,
                timeout_s: float, step: Callable[[int, int, int], None]) -> None:
    """Call ``step(i, a, b)`` for bytes ``[a, b)`` of page ``i`` (``sizes[i]`` bytes, k then
    v) over the batch's stream, in order, each part once the client has written it: at once
    for ``fill`` 0, else as the fill words say; then check that they still name ``fill``."""
    words = np.frombuffer(seg, np.uint64, 2, FILL_OFFSET) if fill else None
    deadline = time.monotonic() + timeout_s
    total = sum(sizes)
    done, start, i = 0, 0, 0  # stream bytes done; where page i starts in the stream
    while done < total:
        ready = (total if words is None
                 else _wait(words, fill, done, total, ended, deadline, timeout_s))
        while done < ready:
            a, b = done - start, min(ready - start, sizes[i])
            step(i, a, b)
            done = start + b
            if b == sizes[i]:
                start, i = done, i + 1
    if words is not None and int(words[0]) != fill:
        raise Aborted("the client reused its segment while the daemon read this put's bytes",
                      field="shm_fill")


def _check(dst: np.ndarray, a: int, b: int, h: PageHeader) -> None:
    """NaN/Inf check of ``dst[a:b]`` (a page's k then v); the error names k or v."""
    try:
        check_finite(dst[a:b].data, h.dtype, "k")
    except InvalidArgument:
        n = h.nbytes
        if a < n:
            check_finite(dst[a:min(b, n)].data, h.dtype, "k")
        check_finite(dst[max(a, n):b].data, h.dtype, "v")
        raise


def _wait(words: np.ndarray, fill: int, done: int, total: int, ended: threading.Event,
          deadline: float, timeout_s: float) -> int:
    """How much of the stream is written, once that is more than ``done``: a multiple of 8
    (so every piece ends on an element) or ``total``."""
    polls = 0
    while True:
        if int(words[0]) != fill:
            raise Aborted("the segment's fill words name another put: the client reused its "
                          "segment before this put's bytes were copied", field="shm_fill")
        ready = min(int(words[1]), total)
        if ready != total:
            ready &= ~7
        if ready > done:
            return ready
        polls += 1
        if polls <= _SPINS:
            continue
        if ended.is_set():  # FAILED_PRECONDITION: the client attaches again or goes inline
            raise Conflict("the shm session ended during the put", field="shm_session")
        if time.monotonic() > deadline:
            raise Aborted(f"the client wrote {done} of the put's {total} shared-memory bytes "
                          f"within {timeout_s} s", field="shm_fill")
        time.sleep(0 if polls < _YIELDS else 1e-4)
