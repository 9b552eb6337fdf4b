"""Building requests and decoding replies, shared by the sync and the async client.

Inline page bytes form one byte stream per batch (page 0 k, page 0 v, page 1 k, ...) cut into
``chunk_bytes`` pieces over the stream's messages; see ``proto/kvtier_proto/v1/cache.proto``.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from kvtier_client import shm as shm_mod
from kvtier_client.shm_layout import ALIGN, DATA_OFFSET, align_up
from kvtier_client.tensors import FetchedPage, Page, WireTensor, from_wire, nbytes_of, to_wire
from kvtier_proto.v1 import cache_pb2 as pb

DEFAULT_CHUNK_BYTES = 4 << 20


@dataclass(frozen=True, slots=True)
class WirePage:
    key: bytes
    k: WireTensor
    v: WireTensor
    start_position: int
    chain_position: int | None


def wire_pages(keys: Sequence[bytes], pages: Sequence[Page | tuple[Any, ...]]) -> list[WirePage]:
    """Convert the caller's pages; ValueError naming the page index for bad input."""
    if len(keys) != len(pages):
        raise ValueError(f"keys and pages differ in length: {len(keys)} vs {len(pages)}")
    out = []
    for i, (key, p) in enumerate(zip(keys, pages)):
        if not isinstance(p, Page):
            p = Page(*p)
        if not isinstance(key, (bytes, bytearray)):
            raise ValueError(f"keys[{i}] must be bytes, got {type(key).__name__}")
        out.append(WirePage(bytes(key), to_wire(p.k, f"pages[{i}].k"),
                            to_wire(p.v, f"pages[{i}].v"), int(p.start_position),
                            p.chain_position))
    return out


def header(p: WirePage, shm_offset: int | None = None) -> pb.PageHeader:
    h = pb.PageHeader(key=p.key, dtype=p.k.dtype, shape=list(p.k.shape),
                      start_position=p.start_position, k_len=p.k.data.nbytes,
                      v_len=p.v.data.nbytes, v_dtype=p.v.dtype, v_shape=list(p.v.shape))
    if p.chain_position is not None:
        h.chain_position = p.chain_position
    if shm_offset is not None:
        h.shm_offset = shm_offset
    return h


def put_request(namespace: str, pages: Sequence[WirePage], shm_session: str = "",
                shm_offsets: Sequence[int | None] | None = None,
                shm_fill: int = 0, shm_ring: tuple[int, int] = (0, 0),
                shm_reclaim: bool = False) -> pb.PutRequest:
    """One Put message holding every header and every inline byte; ``shm_ring``
    (offset, slots) lends the pages' ranges (see :func:`lend_in_segment`); ``shm_reclaim``
    asks the daemon to copy out the pages lent before (the lend area is full)."""
    offsets = shm_offsets or [None] * len(pages)
    data = b"".join(mv for p, off in zip(pages, offsets) if off is None
                    for mv in (p.k.data, p.v.data))
    return pb.PutRequest(namespace=namespace, pages=[header(p, o) for p, o in zip(pages, offsets)],
                         shm_session=shm_session, data=data, shm_fill=shm_fill,
                         shm_ring_offset=shm_ring[0], shm_ring_slots=shm_ring[1],
                         shm_reclaim=shm_reclaim)


def inline_bytes(pages: Sequence[WirePage], shm_offsets: Sequence[int | None] | None = None) -> int:
    offsets = shm_offsets or [None] * len(pages)
    return sum(p.k.data.nbytes + p.v.data.nbytes for p, o in zip(pages, offsets) if o is None)


def put_requests(namespace: str, pages: Sequence[WirePage], chunk_bytes: int,
                 shm_session: str = "", shm_offsets: Sequence[int | None] | None = None,
                 shm_fill: int = 0, shm_reclaim: bool = False) -> Iterator[pb.PutRequest]:
    """The messages of one Put stream: all headers first, then the inline bytes in chunks."""
    offsets = shm_offsets or [None] * len(pages)
    headers = [header(p, off) for p, off in zip(pages, offsets)]
    parts = [mv for p, off in zip(pages, offsets) if off is None for mv in (p.k.data, p.v.data)]
    first = pb.PutRequest(namespace=namespace, pages=headers, shm_session=shm_session,
                          shm_fill=shm_fill, shm_reclaim=shm_reclaim)
    pending = bytearray()
    sent_first = False
    for part in parts:
        pos = 0
        while pos < len(part):
            if not pending and len(part) - pos >= chunk_bytes:
                piece = bytes(part[pos:pos + chunk_bytes])
                pos += chunk_bytes
            else:
                take = min(chunk_bytes - len(pending), len(part) - pos)
                pending += part[pos:pos + take]
                pos += take
                if len(pending) < chunk_bytes:
                    continue
                piece, pending = bytes(pending), bytearray()
            if not sent_first:
                first.data = piece
                sent_first = True
                yield first
            else:
                yield pb.PutRequest(data=piece)
    if pending or not sent_first:
        if not sent_first:
            first.data = bytes(pending)
            yield first
        else:
            yield pb.PutRequest(data=bytes(pending))


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a put's pages go in the segment. ``offsets``: per page, or None (inline).
    ``parts``: the batch's shm byte stream in order (page k, page v, ...), each as
    ``(offset, bytes to copy there)`` or ``(offset, length)`` for bytes already in place."""

    offsets: list[int | None]
    parts: list[tuple[int, memoryview | int]]

    @property
    def copy_bytes(self) -> int:
        return sum(p.nbytes for _, p in self.parts if isinstance(p, memoryview))

    @property
    def stream_bytes(self) -> int:
        """Bytes of the batch's shm byte stream, copied or already in place."""
        return sum(p.nbytes if isinstance(p, memoryview) else p for _, p in self.parts)


def plan_in_segment(segment: shm_mod.Segment, pages: Sequence[WirePage]) -> Placement:
    """Where each page goes, copying nothing yet.

    A staged page (k and v already side by side in the staging area) is sent by its offset
    as it is. Other pages go to the request area, k then v, 64-byte aligned, from
    ``DATA_OFFSET``; a page that does not fit what is left (or whose k and v differ in size,
    which the daemon refuses anyway) goes inline in the same call.
    """
    offsets: list[int | None] = []
    parts: list[tuple[int, memoryview | int]] = []
    cursor = DATA_OFFSET
    for p in pages:
        kn, vn = p.k.data.nbytes, p.v.data.nbytes
        staged = segment.staged_offset(p.k.data)
        if staged is not None and kn == vn and segment.staged_offset(p.v.data) == staged + kn:
            offsets.append(staged)
            parts.append((staged, 2 * kn))
            continue
        if kn != vn or cursor + kn + vn > segment.request_end:
            offsets.append(None)
            continue
        offsets.append(cursor)
        parts += [(cursor, p.k.data), (cursor + kn, p.v.data)]
        cursor = align_up(cursor + kn + vn)
    return Placement(offsets, parts)


def lend_in_segment(segment: shm_mod.Segment, pages: Sequence[WirePage]) -> Placement | None:
    """Each page in a fresh range of the lend area, to be lent to the daemon (kept as the
    page, no daemon copy; handed back through the return ring), or None when the segment has
    no lend area, a page is staged (the caller may refill it) or does not fit: then nothing
    is allocated. Ranges handed back since the last call are freed first."""
    lend = segment.lend
    if lend is None or not shm_mod.OVERLAP_SAFE:  # the return ring needs ordered stores
        return None
    segment.take_back()
    need = sum(-(-(p.k.data.nbytes + p.v.data.nbytes) // ALIGN) * ALIGN
               for p in pages)
    # "full" (worth asking the daemon to copy lent pages out) only for a batch that an empty
    # area could take
    segment.lend_full = need <= lend.capacity and len(pages) <= segment.ring_slots
    if lend.count + len(pages) > segment.ring_slots:  # the ring could not return them all
        return None
    offsets: list[int | None] = []
    parts: list[tuple[int, memoryview | int]] = []
    for p in pages:
        kn, vn = p.k.data.nbytes, p.v.data.nbytes
        if kn != vn or not kn or segment.staged_offset(p.k.data) is not None:
            segment.lend_full = False  # not lendable, whatever the room
            off = None
        else:
            off = lend.alloc(kn + vn)
        if off is None:
            for taken in offsets:
                lend.free(cast(int, taken))
            return None
        offsets.append(off)
        parts += [(off, p.k.data), (off + kn, p.v.data)]
    segment.lend_full = False
    return Placement(offsets, parts)


def overlapped(plan: Placement, pages: Sequence[WirePage], chunk_bytes: int) -> bool:
    """Whether a put placed by ``plan`` can start its call before the copy (``shm_fill``):
    one unary message, at least ``OVERLAP_MIN_BYTES`` to copy, on x86-64."""
    return (shm_mod.OVERLAP_SAFE and plan.copy_bytes >= shm_mod.OVERLAP_MIN_BYTES
            and inline_bytes(pages, plan.offsets) <= chunk_bytes)


def copy_in(segment: shm_mod.Segment, plan: Placement, fill: int) -> list[int | None]:
    """Copy ``plan``'s bytes into the segment, all in place before the call; its offsets.

    The put's number ``fill`` is announced first and the stream marked complete after: the
    daemon checks that number around its copy, so a daemon still busy with an earlier put
    that the client gave up on cannot take these bytes for that put's pages."""
    segment.start_fill(fill)
    view = segment.view
    for off, part in plan.parts:
        if isinstance(part, memoryview):
            view[off:off + part.nbytes] = part
    words = segment.fill_words()
    words[1] = plan.stream_bytes
    del words
    return plan.offsets


def fill_segment(segment: shm_mod.Segment, plan: Placement, fill: int,
                 chunk: int = shm_mod.FILL_CHUNK) -> None:
    """Copy ``plan``'s bytes in pieces of ``chunk`` while the put with ``shm_fill = fill`` is
    in flight, publishing after each piece how much of the stream is written (the daemon
    copies behind). The caller called :meth:`~kvtier_client.shm.Segment.start_fill` first.
    The copies release the GIL, so the thread that waits for the call is not held up."""
    words = segment.fill_words()
    written = 0
    for off, part in plan.parts:
        if not isinstance(part, memoryview):
            written += part
            words[1] = written
            continue
        n = part.nbytes
        dst = segment.array(off, n)
        src = np.frombuffer(part, np.uint8)
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            np.copyto(dst[a:b], src[a:b])
            words[1] = written + b
        written += n
        del dst
    del words


class Filler:
    """A client's copier thread: fills the segment for an overlapped put while the calling
    thread makes the (blocking) call, which is cheaper than an asynchronous call here."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[shm_mod.Segment, Placement, int] | None] = \
            queue.SimpleQueue()
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self, segment: shm_mod.Segment, plan: Placement, fill: int) -> None:
        """Have the copier fill ``plan``; where no thread can be started (a thread limit),
        fill it here and now, before the caller's call, as a put that does not overlap."""
        self._done.clear()
        if self._thread is None:
            thread = threading.Thread(target=self._run, name="kvtier-shm-fill", daemon=True)
            try:
                thread.start()
            except RuntimeError:
                self._done.set()
                fill_segment(segment, plan, fill)
                return
            self._thread = thread
        self._jobs.put((segment, plan, fill))

    def wait(self, quiet: bool = False) -> None:
        """Until the started fill ended; raises what it raised unless ``quiet``."""
        self._done.wait()
        error, self._error = self._error, None
        if error is not None and not quiet:
            raise error

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                fill_segment(*job)
            except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
                self._error = e
            finally:
                del job
                self._done.set()

    def close(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread = None


def attach_request(namespace: str, segment: shm_mod.Segment) -> pb.AttachShmRequest:
    return pb.AttachShmRequest(namespace=namespace, path=segment.path, size=segment.size,
                               token=segment.token)


def get_request(namespace: str, keys: Sequence[bytes], chunk_bytes: int,
                session: shm_mod.Session | None = None) -> pb.GetRequest:
    """A Get request; with ``session`` the daemon places what fits into its segment."""
    req = pb.GetRequest(namespace=namespace, keys=list(keys), chunk_bytes=chunk_bytes)
    if session is not None:
        req.shm_session = session.id
        req.shm_offset = DATA_OFFSET
        req.shm_capacity = session.segment.capacity
    return req


def deferred_request(req: pb.GetRequest, indexes: Sequence[int]) -> pb.GetRequest:
    """``req`` for the keys at ``indexes`` only (the pages a unary Get deferred)."""
    again = pb.GetRequest()
    again.CopyFrom(req)
    del again.keys[:]
    again.keys.extend(req.keys[i] for i in indexes)
    return again


class GetAssembler:
    """Decodes a Get reply stream into pages, reading shm-placed pages from ``segment``."""

    def __init__(self, n_keys: int, as_torch: bool | str,
                 segment: memoryview | None = None) -> None:
        self._n = n_keys
        self._as_torch = as_torch
        self._segment = segment
        self._results: list[pb.PageResult] = []
        self._bufs: list[np.ndarray] = []  # one uint8 buffer per inline tensor, in stream order
        self._fill = 0  # index into _bufs of the buffer being filled
        self._pos = 0

    def feed(self, reply: pb.GetReply) -> None:
        if reply.pages:
            for r in reply.pages:
                self._results.append(r)
                if r.found and not r.deferred and not r.HasField("shm_offset"):
                    self._bufs += [np.empty(r.k_len, np.uint8), np.empty(r.v_len, np.uint8)]
        data = memoryview(reply.data)
        pos = 0
        while pos < len(data):
            if self._fill >= len(self._bufs):
                raise ValueError("get reply carries more bytes than its results announce")
            buf = self._bufs[self._fill]
            take = min(len(buf) - self._pos, len(data) - pos)
            buf[self._pos:self._pos + take] = np.frombuffer(data[pos:pos + take], np.uint8)
            self._pos += take
            pos += take
            if self._pos == len(buf):
                self._fill, self._pos = self._fill + 1, 0

    @property
    def deferred(self) -> list[int]:
        """Indexes of found pages whose bytes did not fit a unary reply (fetch by stream)."""
        return [r.index for r in self._results if r.deferred]

    def result(self) -> list[FetchedPage | None]:
        """One entry per key: the page, or None for a miss (and for deferred pages)."""
        while self._fill < len(self._bufs) and len(self._bufs[self._fill]) == 0:
            self._fill += 1
        if self._fill != len(self._bufs):
            raise ValueError("get reply stream ended before all page bytes arrived")
        out: list[FetchedPage | None] = [None] * self._n
        it = iter(self._bufs)
        for r in self._results:
            if not r.found or r.deferred:
                continue
            shape = tuple(int(s) for s in r.shape)
            if r.HasField("shm_offset"):
                assert self._segment is not None
                off = r.shm_offset
                kb = np.frombuffer(self._segment, np.uint8, r.k_len, off).copy()
                vb = np.frombuffer(self._segment, np.uint8, r.v_len, off + r.k_len).copy()
            else:
                kb, vb = next(it), next(it)
            out[r.index] = FetchedPage(
                k=from_wire(kb, r.dtype, shape, self._as_torch),
                v=from_wire(vb, r.dtype, shape, self._as_torch),
                dtype=r.dtype, shape=shape, start_position=r.start_position, tier=r.tier,
                precision=r.precision,
            )
        return out


__all__ = [
    "DEFAULT_CHUNK_BYTES", "Filler", "GetAssembler", "WirePage", "attach_request",
    "copy_in", "deferred_request", "fill_segment", "get_request", "lend_in_segment",
    "nbytes_of", "overlapped", "plan_in_segment", "put_requests", "wire_pages",
]
