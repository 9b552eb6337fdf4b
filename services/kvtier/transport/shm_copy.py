"""Copying a put's pages out of a client's shared-memory segment into memory the daemon owns.

A put names where each page's k and v lie in the session's segment (``shm_offset``). The daemon
keeps no view of that memory: each page is copied once into a buffer that the store then adopts
(``TierStore.put_checked(owned=True)``), and the NaN/Inf check runs on that copy, so what was
checked is what is kept, whatever the client writes into its segment afterwards.

With ``shm_fill`` (see ``cache.proto``) the client is still writing while the call starts. The
batch's shm bytes form one stream, page 0 k, page 0 v, page 1 k, ..., and the client publishes
in the segment's fill words how much of that stream is written::

    16                 24                       32
    | fill number (u64) | bytes written (u64)   |

The daemon copies each part as soon as it is written, so the client's copy and the daemon's
overlap instead of adding up. The client uses this only on x86-64, whose stores become visible
in program order: a count seen by the daemon implies the bytes before it are visible too. If
the fill number changes (the client gave up and reused the segment), the session ends, or the
bytes do not arrive within ``FILL_TIMEOUT_S``, the put is ABORTED and stores nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import numpy as np
import torch

from kvtier.errors import Aborted
from kvtier.pages import check_finite
from kvtier.transport.convert import Header, page_of_buffer
from kvtier.types import Page

FILL_OFFSET = 16
FILL_TIMEOUT_S = 2.0
_SPINS = 64  # polls before the waiting thread starts yielding the GIL
_YIELDS = 4000  # then sleep(0) polls before it sleeps 100 us between polls


class _Piece:
    """One tensor's bytes: where they start in the fill stream and in the segment."""

    __slots__ = ("start", "offset", "dst", "dtype", "name")

    def __init__(self, start: int, offset: int, dst: np.ndarray, dtype: str, name: str) -> None:
        self.start, self.offset, self.dst, self.dtype, self.name = start, offset, dst, dtype, name


def copy_pages(seg: memoryview, headers: Sequence[Header], fill: int,
               ended: threading.Event, timeout_s: float = FILL_TIMEOUT_S) -> list[Page]:
    """The pages of ``headers`` (each with its checked ``shm_offset``), copied out of ``seg``.

    ``fill`` 0: the bytes are all in place. Otherwise follow the fill words as described above.
    Raises InvalidArgument for NaN/Inf (naming k or v), Aborted as described above.
    """
    src = np.frombuffer(seg, np.uint8)
    bufs: list[torch.Tensor] = []
    pieces: list[_Piece] = []
    pos = 0
    for h in headers:
        assert h.shm_offset is not None
        n = h.nbytes
        buf = torch.empty(2 * n, dtype=torch.uint8)
        arr = buf.numpy()
        pieces.append(_Piece(pos, h.shm_offset, arr[:n], h.dtype, "k"))
        pieces.append(_Piece(pos + n, h.shm_offset + n, arr[n:], h.dtype, "v"))
        bufs.append(buf)
        pos += 2 * n
    total = pos
    words = np.frombuffer(seg, np.uint64, 2, FILL_OFFSET) if fill else None
    deadline = time.monotonic() + timeout_s
    done, i = 0, 0
    while done < total:
        ready = (total if words is None
                 else _wait(words, fill, done, total, ended, deadline, timeout_s))
        while done < ready:
            p = pieces[i]
            a, b = done - p.start, min(ready - p.start, len(p.dst))
            p.dst[a:b] = src[p.offset + a:p.offset + b]
            check_finite(p.dst[a:b].data, p.dtype, p.name)
            done = p.start + b
            if b == len(p.dst):
                i += 1
    if words is not None and int(words[0]) != fill:
        raise Aborted("the client reused its segment while the daemon copied this put's bytes",
                      field="shm_fill")
    return [page_of_buffer(h, buf) for h, buf in zip(headers, bufs)]


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
        if ended.is_set():
            raise Aborted("the shm session ended during the put", field="shm_session")
        if time.monotonic() > deadline:
            raise Aborted(f"the client wrote {done} of the put's {total} shared-memory bytes "
                          f"within {timeout_s} s", field="shm_fill")
        time.sleep(0 if polls < _YIELDS else 1e-4)
