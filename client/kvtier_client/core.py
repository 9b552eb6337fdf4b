"""The client core: every call planned and read back here, without any I/O of its own.

:class:`~kvtier_client.client.KVTierClient` and :class:`~kvtier_client.aio.AsyncKVTierClient`
are thin drivers over this module: they make the gRPC calls it plans (blocking, or awaited on an
event loop) and hand what comes back to it. Everything else is decided here, once for both:

- the requests: pages as wire tensors and headers; a put as one message or a chunked stream
  (:func:`plan_put`); a get as one message, then a stream for the pages it deferred
  (:class:`GetCollector`); lookup, promote, delete and stats;
- the shared-memory choice: whether a put lends its pages, copies them into the request area
  before its call or while the call is in flight (``shm_fill``), and where a get's pages land;
- the retry rule (:class:`Attempts`) and what a failed call means for the session
  (:func:`put_failed`, :func:`call_failed`): keep it, start a new one, or go inline;
- the replies: pages out of Get replies and the segment, outcomes, lookup and stats results.

Planning a put prepares the segment (ranges of the lend area, the fill number, the bytes that go
before the call); the copy that runs while a call is in flight is :func:`fill_segment`, which
the drivers run beside their call. Inline page bytes form one byte stream per batch (page 0 k,
page 0 v, page 1 k, ...) cut into ``chunk_bytes`` pieces over the stream's messages; see
``proto/kvtier_proto/v1/cache.proto``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import grpc
import numpy as np

from kvtier_client import shm as shm_mod
from kvtier_client.errors import DeadlineExceededError, KVTierClientError, from_rpc_error
from kvtier_client.shm import abandoned, ranges_back, session_lost
from kvtier_client.shm_layout import ALIGN, DATA_OFFSET, align_up
from kvtier_client.tensors import FetchedPage, Page, WireTensor, from_wire, nbytes_of, to_wire
from kvtier_proto.v1 import cache_pb2 as pb

DEFAULT_CHUNK_BYTES = 4 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
]
RETRIES = 3
BACKOFF_S = 0.05
_LOOPBACK = ("127.", "localhost", "[::1]", "::1", "unix:")


# -- the session --------------------------------------------------------------------------------

def wants_shared_memory(shared_memory: bool | str, target: str) -> bool:
    """``shared_memory`` True, or ``"auto"`` and a loopback ``target``."""
    return shared_memory is True or (shared_memory == "auto" and target.startswith(_LOOPBACK))


def attach_request(namespace: str, segment: shm_mod.Segment) -> pb.AttachShmRequest:
    """The ``AttachShm`` call that maps a new ``segment`` in the daemon for ``namespace``."""
    return pb.AttachShmRequest(namespace=namespace, path=segment.path, size=segment.size,
                               token=segment.token)


def call_failed(slot: shm_mod.SessionSlot, exc: grpc.RpcError) -> bool:
    """What a call through the session that failed with ``exc`` means for it; True: make it
    again inline (the daemon no longer knows the session). A call the daemon may still be
    serving may still read or write the segment: a new one next time."""
    if session_lost(exc):
        slot.drop()
        return True
    if abandoned(exc):
        slot.drop()
    return False


# -- the retry rule -----------------------------------------------------------------------------

class Attempts:
    """The retry rule of one call, within its deadline (``timeout_s`` from now).

    Only idempotent calls (put - per key -, get, lookup, promote, stats) are retried, only on
    UNAVAILABLE, at most ``RETRIES`` attempts in all, each after ``BACKOFF_S`` times the
    attempts so far, and only while the deadline leaves that much time. Errors come out as
    :mod:`kvtier_client.errors` classes.
    """

    def __init__(self, method: str, timeout_s: float, idempotent: bool) -> None:
        self.method = method
        self.idempotent = idempotent
        self.deadline = time.monotonic() + timeout_s
        self.attempt = 0

    def start(self) -> float:
        """Begin the next attempt: the seconds it may take (DeadlineExceededError if none)."""
        self.attempt += 1
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceededError("deadline exceeded before the call could be retried",
                                        method=self.method)
        return left

    def failed(self, e: grpc.RpcError | KVTierClientError) -> float:
        """The attempt failed with ``e`` (a gRPC error, or a typed one from the data channel):
        the seconds to wait before the next one, or the typed error raised when the rule
        allows no other."""
        err = e if isinstance(e, KVTierClientError) else from_rpc_error(e, self.method)
        wait = BACKOFF_S * self.attempt
        if (self.idempotent and err.code == "UNAVAILABLE" and self.attempt < RETRIES
                and self.deadline - time.monotonic() > wait):
            return wait
        raise err from None


# -- puts ---------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class WirePage:
    key: bytes
    k: WireTensor
    v: WireTensor
    start_position: int
    chain_position: int | None
    expected_reuse_s: float | None = None


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
        reuse = p.expected_reuse_s
        if reuse is not None and not (isinstance(reuse, (int, float)) and 0 <= reuse < 1e300):
            raise ValueError(f"pages[{i}].expected_reuse_s must be seconds >= 0, got {reuse!r}")
        out.append(WirePage(bytes(key), to_wire(p.k, f"pages[{i}].k"),
                            to_wire(p.v, f"pages[{i}].v"), int(p.start_position),
                            p.chain_position, None if reuse is None else float(reuse)))
    return out


def header(p: WirePage, shm_offset: int | None = None) -> pb.PageHeader:
    h = pb.PageHeader(key=p.key, dtype=p.k.dtype, shape=list(p.k.shape),
                      start_position=p.start_position, k_len=p.k.data.nbytes,
                      v_len=p.v.data.nbytes, v_dtype=p.v.dtype, v_shape=list(p.v.shape))
    if p.chain_position is not None:
        h.chain_position = p.chain_position
    if p.expected_reuse_s is not None:
        h.expected_reuse_s = p.expected_reuse_s
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
                 shm_fill: int = 0, shm_reclaim: bool = False,
                 hint_session: str = "") -> Iterator[pb.PutRequest]:
    """The messages of one Put stream: all headers first, then the inline bytes in chunks."""
    offsets = shm_offsets or [None] * len(pages)
    headers = [header(p, off) for p, off in zip(pages, offsets)]
    parts = [mv for p, off in zip(pages, offsets) if off is None for mv in (p.k.data, p.v.data)]
    first = pb.PutRequest(namespace=namespace, pages=headers, shm_session=shm_session,
                          shm_fill=shm_fill, shm_reclaim=shm_reclaim, session=hint_session)
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


@dataclass(frozen=True, slots=True)
class PutPlan:
    """How one put goes out: one ``Put`` message (``request``) or the ``PutStream`` of
    :meth:`stream`; with ``overlap``, the bytes to copy into the segment (:func:`fill_segment`,
    fill number ``fill``) while the unary call is in flight; ``lending``: the daemon keeps the
    pages where they lie in the segment's lend area."""

    namespace: str
    pages: Sequence[WirePage]
    chunk_bytes: int
    request: pb.PutRequest | None
    session_id: str = ""
    offsets: Sequence[int | None] | None = None
    fill: int = 0
    reclaim: bool = False
    segment: shm_mod.Segment | None = None
    overlap: Placement | None = None
    lending: bool = False
    hint_session: str = ""  # the conversation/session the pages belong to (a hint)

    def stream(self) -> Iterator[pb.PutRequest]:
        return put_requests(self.namespace, self.pages, self.chunk_bytes, self.session_id,
                            self.offsets, self.fill, self.reclaim, self.hint_session)


def with_session(plan: PutPlan, session: str) -> PutPlan:
    """``plan`` naming the pages' conversation/session (a hint; "" leaves it as it is)."""
    if not session:
        return plan
    if plan.request is not None:
        plan.request.session = session
    return replace(plan, hint_session=session)


def plan_put(namespace: str, pages: Sequence[WirePage], session: shm_mod.Session | None,
             chunk_bytes: int, overlap_copy: bool) -> PutPlan:
    """Plan a put (inline without ``session``) and prepare the segment for it.

    Through the segment, pages that fit the lend area are lent; the others go to the request
    area, copied there by the daemon, and what does not fit goes inline in the same call. A put
    with at least ``OVERLAP_MIN_BYTES`` to copy in one unary message starts its call first and
    copies while it is in flight (``overlap_copy``, x86-64 only); any other put has its bytes in
    place before its call.
    """
    if session is None:
        return _inline_plan(namespace, pages, chunk_bytes)
    segment = session.segment
    lent = lend_in_segment(segment, pages)
    if lent is not None:
        fill = session.next_fill()
        overlap = overlap_copy and overlapped(lent, pages, chunk_bytes)
        offsets = lent.offsets if overlap else copy_in(segment, lent, fill)
        req = put_request(namespace, pages, session.id, offsets, fill,
                          (segment.ring_offset, segment.ring_slots))
        return PutPlan(namespace, pages, chunk_bytes, req, session.id, offsets, fill,
                       segment=segment, overlap=lent if overlap else None, lending=True)
    placed = plan_in_segment(segment, pages)
    fill = session.next_fill()
    if not (overlap_copy and overlapped(placed, pages, chunk_bytes)):
        offsets = copy_in(segment, placed, fill)
        return _inline_plan(namespace, pages, chunk_bytes, session.id, offsets, fill,
                            segment.wants_reclaim())
    req = put_request(namespace, pages, session.id, placed.offsets, fill,
                      shm_reclaim=segment.wants_reclaim())
    return PutPlan(namespace, pages, chunk_bytes, req, session.id, placed.offsets, fill,
                   segment=segment, overlap=placed)


def _inline_plan(namespace: str, pages: Sequence[WirePage], chunk_bytes: int,
                 session_id: str = "", offsets: Sequence[int | None] | None = None,
                 fill: int = 0, reclaim: bool = False) -> PutPlan:
    """One Put message when the inline bytes fit one chunk, else the chunked PutStream."""
    req = None
    if inline_bytes(pages, offsets) <= chunk_bytes:
        req = put_request(namespace, pages, session_id, offsets, fill, shm_reclaim=reclaim)
    return PutPlan(namespace, pages, chunk_bytes, req, session_id, offsets, fill, reclaim)


def put_failed(slot: shm_mod.SessionSlot, plan: PutPlan | None, exc: BaseException) -> bool:
    """What a put that raised ``exc`` means for the session; True: send it again inline.

    A lending put whose ranges the daemon does not promise back (``RANGES_BACK``) leaves the
    segment unusable: a new one next time. A call the daemon may still be serving (deadline,
    cancel) may still touch the segment: a new one too. A session the daemon no longer knows
    is dropped and the put goes inline.
    """
    if plan is not None and plan.lending and not ranges_back(exc):
        slot.drop()
    return isinstance(exc, grpc.RpcError) and call_failed(slot, exc)


def put_outcomes(reply: pb.PutReply) -> list[str]:
    return ["stored" if o == pb.PUT_OUTCOME_STORED else "exists" for o in reply.outcomes]


# -- gets ---------------------------------------------------------------------------------------

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


class GetCollector:
    """One get: the unary ``Get`` reply first (:meth:`first`), then, for the pages too big for
    it, the ``GetStream`` of the request :meth:`first` returns, within what is left of the
    call's ``left`` seconds (:meth:`time_left`). Pages placed in the segment are copied out as
    soon as a reply is complete, before the segment is used again."""

    def __init__(self, req: pb.GetRequest, left: float, as_torch: bool | str,
                 segment: memoryview | None) -> None:
        self._req = req
        self._deadline = time.monotonic() + left
        self._as_torch = as_torch
        self._segment = segment
        self._out: list[FetchedPage | None] = []
        self._deferred: list[int] = []
        self._rest: GetAssembler | None = None

    def first(self, reply: pb.GetReply) -> pb.GetRequest | None:
        asm = GetAssembler(len(self._req.keys), self._as_torch, self._segment)
        asm.feed(reply)
        self._out = asm.result()
        self._deferred = asm.deferred
        if not self._deferred:
            return None
        self._rest = GetAssembler(len(self._deferred), self._as_torch, self._segment)
        return deferred_request(self._req, self._deferred)

    def time_left(self) -> float:
        return self._deadline - time.monotonic()

    def more(self, reply: pb.GetReply) -> None:
        assert self._rest is not None
        self._rest.feed(reply)

    def result(self) -> list[FetchedPage | None]:
        if self._rest is not None:
            for i, page in zip(self._deferred, self._rest.result()):
                self._out[i] = page
        return self._out


# -- lookup, promote, delete, stats -------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class LookupResult:
    prefix_length: int
    tiers: tuple[str | None, ...]


@dataclass(frozen=True, slots=True)
class TierStats:
    name: str
    medium: str
    codec: str
    capacity_bytes: int
    high_watermark: float
    low_watermark: float
    pages: int
    bytes: int
    hits: int
    misses: int
    demotions: int
    promotions: int
    evictions: dict[str, int]


@dataclass(frozen=True, slots=True)
class CacheStats:
    tiers: tuple[TierStats, ...]
    redis_up: bool
    gets: int
    puts: int
    policy: str
    uptime_s: float
    prefetched: int = 0  # pages the daemon promoted ahead of use (lookup prefetch, hints)
    prefetch_hits: int = 0  # gets it served from the top tier thanks to such a promotion


def lookup_request(namespace: str, keys: Sequence[bytes], session: str = "",
                   prefetch: bool = False) -> pb.LookupRequest:
    return pb.LookupRequest(namespace=namespace, keys=list(keys), session=session,
                            prefetch=prefetch)


def hint_request(namespace: str, queued: Sequence[Sequence[bytes]] = (),
                 ended_sessions: Sequence[str] = ()) -> pb.HintRequest:
    """A worker's hints: the key chains of its queued requests (next first) and the sessions
    that ended. ValueError for keys that are not bytes."""
    chains = []
    for i, chain in enumerate(queued):
        if isinstance(chain, (bytes, bytearray)):
            raise ValueError(f"queued[{i}] must be a sequence of keys, got one key")
        keys = list(chain)
        for j, k in enumerate(keys):
            if not isinstance(k, (bytes, bytearray)):
                raise ValueError(f"queued[{i}][{j}] must be bytes, got {type(k).__name__}")
        chains.append(pb.KeyChain(keys=[bytes(k) for k in keys]))
    return pb.HintRequest(namespace=namespace, queued=chains,
                          ended_sessions=list(ended_sessions))


def lookup_result(r: pb.LookupReply) -> LookupResult:
    return LookupResult(r.prefix_length, tuple(t or None for t in r.tiers))


def promote_request(namespace: str, keys: Sequence[bytes], tier: str) -> pb.PromoteRequest:
    return pb.PromoteRequest(namespace=namespace, keys=list(keys), tier=tier)


def delete_request(namespace: str, keys: Sequence[bytes]) -> pb.DeleteRequest:
    return pb.DeleteRequest(namespace=namespace, keys=list(keys))


def stats_request(namespace: str) -> pb.StatsRequest:
    return pb.StatsRequest(namespace=namespace)


def cache_stats(r: pb.StatsReply) -> CacheStats:
    return CacheStats(
        tiers=tuple(TierStats(t.name, t.medium, t.codec, t.capacity_bytes, t.high_watermark,
                              t.low_watermark, t.pages, t.bytes, t.hits, t.misses, t.demotions,
                              t.promotions, dict(t.evictions)) for t in r.tiers),
        redis_up=r.redis_up, gets=r.gets, puts=r.puts, policy=r.policy, uptime_s=r.uptime_s,
        prefetched=r.prefetched, prefetch_hits=r.prefetch_hits,
    )


__all__ = [
    "BACKOFF_S", "CHANNEL_OPTIONS", "DEFAULT_CHUNK_BYTES", "RETRIES", "Attempts", "CacheStats",
    "GetAssembler", "GetCollector", "LookupResult", "Placement", "PutPlan", "TierStats",
    "WirePage", "attach_request", "cache_stats", "call_failed", "copy_in", "deferred_request",
    "delete_request", "fill_segment", "get_request", "hint_request", "lend_in_segment",
    "lookup_request", "lookup_result", "nbytes_of", "overlapped", "plan_in_segment",
    "plan_put", "promote_request", "put_failed", "put_outcomes", "put_request",
    "put_requests", "stats_request", "wants_shared_memory", "wire_pages", "with_session",
]
