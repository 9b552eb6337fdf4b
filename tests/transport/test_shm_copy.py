"""Copying put pages out of a segment: the daemon's own memory, checked there, and the fill
protocol (bytes written while the call is in flight) with its failure modes, which lent pages
(kept where they lie) follow too."""

from __future__ import annotations

import gc
import mmap
import struct
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from kvtier.errors import Aborted, Conflict, InvalidArgument
from kvtier.pages import PageHeader
from kvtier.store.buffers import BufferPool
from kvtier.transport.shm.copy import copy_pages, lent_pages
from kvtier.transport.shm.lend import ReturnRing
from kvtier.types import Page
from kvtier_client.shm_layout import FILL_OFFSET, RING_HEAD_OFFSET

SHAPE = (2, 64, 2, 64)  # float16: 32 KiB per tensor
N = 2 * int(np.prod(SHAPE))
BASE = 64
RING = 1 << 19  # a return ring for lent pages, past the pages


def _copied(mm: mmap.mmap, seg: memoryview, headers: list[PageHeader], fill: int,
            ended: threading.Event | None = None, **kw: float) -> list[Page]:
    return copy_pages(seg, headers, fill, ended or threading.Event(), BufferPool(), **kw)


def _lent(mm: mmap.mmap, seg: memoryview, headers: list[PageHeader], fill: int,
          ended: threading.Event | None = None, **kw: float) -> list[Page]:
    ring = ReturnRing(mm, RING, 16, threading.Event())
    return lent_pages(seg, ring, headers, fill, ended or threading.Event(), **kw)


READS = pytest.mark.parametrize("read", [_copied, _lent], ids=["copied", "lent"])
Read = Callable[..., list[Page]]


def _segment() -> tuple[mmap.mmap, memoryview]:
    mm = mmap.mmap(-1, 1 << 20)
    return mm, memoryview(mm)


def _headers(count: int) -> list[PageHeader]:
    return [PageHeader(b"k%d" % i, "float16", SHAPE, 0, N, None, BASE + i * 2 * N)
            for i in range(count)]


def _source(count: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(count * 2 * N // 2).astype(np.float16).view(np.uint8)


def _check(pages: list, src: np.ndarray) -> None:
    for i, p in enumerate(pages):
        k = src[i * 2 * N:i * 2 * N + N].view(np.float16).reshape(SHAPE)
        v = src[i * 2 * N + N:(i + 1) * 2 * N].view(np.float16).reshape(SHAPE)
        assert np.array_equal(p.k.numpy(), k) and np.array_equal(p.v.numpy(), v)


def test_pages_are_copies_that_later_writes_do_not_reach() -> None:
    mm, seg = _segment()
    src = _source(2)
    seg[BASE:BASE + src.nbytes] = src.tobytes()
    pages = copy_pages(seg, _headers(2), 0, threading.Event(), BufferPool())
    seg[BASE:BASE + src.nbytes] = bytes(src.nbytes)  # the client reuses its segment
    _check(pages, src)
    assert pages[0].k.is_contiguous() and pages[1].v.is_contiguous()


@READS
def test_follows_a_writer_that_publishes_progress(read: Read) -> None:
    mm, seg = _segment()
    src = _source(3, seed=1)
    words = np.frombuffer(mm, np.uint64, 2, FILL_OFFSET)
    words[1], words[0] = 0, 7

    def write() -> None:
        for a in range(0, src.nbytes, 10_000):  # pieces that end inside elements and tensors
            b = min(a + 10_000, src.nbytes)
            time.sleep(0.002)
            seg[BASE + a:BASE + b] = src[a:b].tobytes()
            words[1] = b

    t = threading.Thread(target=write)
    t.start()
    pages = read(mm, seg, _headers(3), 7)
    t.join()
    _check(pages, src)


def test_reused_segment_aborts() -> None:
    mm, seg = _segment()
    words = np.frombuffer(mm, np.uint64, 2, FILL_OFFSET)
    words[1], words[0] = N, 8  # another put's fill number
    with pytest.raises(Aborted) as info:
        copy_pages(seg, _headers(1), 7, threading.Event(), BufferPool())
    assert info.value.field == "shm_fill" and "reused" in info.value.message


def test_number_changed_after_the_last_byte_aborts() -> None:
    mm, seg = _segment()
    words = np.frombuffer(mm, np.uint64, 2, FILL_OFFSET)
    words[1], words[0] = 0, 7

    def finish_then_reuse() -> None:
        time.sleep(0.01)
        words[1] = 2 * N
        words[0] = 8

    t = threading.Thread(target=finish_then_reuse)
    t.start()
    try:
        copy_pages(seg, _headers(1), 7, threading.Event(), BufferPool())
    except Aborted as e:  # seen while waiting, or on the check after the copy
        assert e.field == "shm_fill"
    else:
        pytest.fail("a put whose segment was reused must not be stored")
    t.join()


@READS
def test_bytes_that_never_come_abort_after_the_timeout(read: Read) -> None:
    mm, seg = _segment()
    words = np.frombuffer(mm, np.uint64, 2, FILL_OFFSET)
    words[1], words[0] = 1003, 7
    t0 = time.monotonic()
    with pytest.raises(Aborted) as info:
        read(mm, seg, _headers(1), 7, timeout_s=0.2)
    assert 0.2 <= time.monotonic() - t0 < 5
    assert "wrote 1000 of the put's 65536" in info.value.message  # rounded down to 8 bytes
    if read is _lent:  # the range was lent: it comes back once nothing holds its array
        del info
        gc.collect()
        assert struct.unpack_from("<Q", mm, RING_HEAD_OFFSET) == (1,)
        assert struct.unpack_from("<Q", mm, RING) == (BASE,)


def test_session_end_stops_the_wait() -> None:
    mm, seg = _segment()
    words = np.frombuffer(mm, np.uint64, 2, FILL_OFFSET)
    words[1], words[0] = 0, 7
    ended = threading.Event()
    threading.Timer(0.05, ended.set).start()
    t0 = time.monotonic()
    with pytest.raises(Conflict) as info:  # FAILED_PRECONDITION: attach again or go inline
        copy_pages(seg, _headers(1), 7, ended, BufferPool(), timeout_s=30)
    assert time.monotonic() - t0 < 5 and info.value.field == "shm_session"


@READS
@pytest.mark.parametrize("fill", [0, 7])
def test_nan_in_a_late_piece_is_refused_naming_the_tensor(read: Read, fill: int) -> None:
    mm, seg = _segment()
    src = _source(1)
    src.view(np.float16)[-3] = np.nan  # in v, near the end
    seg[BASE:BASE + src.nbytes] = src.tobytes()
    words = np.frombuffer(mm, np.uint64, 2, FILL_OFFSET)
    words[1], words[0] = src.nbytes + 999, 7  # a count beyond the stream is clipped
    with pytest.raises(InvalidArgument) as info:
        read(mm, seg, _headers(1), fill)
    assert info.value.field == "v" and "NaN" in info.value.message
