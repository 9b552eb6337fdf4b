"""The synchronous client an inference worker uses: :class:`KVTierClient`.

Every call takes a batch of keys, a namespace (the client's default unless given) and a
deadline (``timeout_s``, the client's default unless given). Only idempotent calls (put - per
key -, get, lookup, promote, stats) are retried, and only on UNAVAILABLE, within the deadline.
Errors are :mod:`kvtier_client.errors` classes carrying the status code and the daemon's message.

Page bytes travel inline over gRPC (chunked streams) or, when the daemon is on this host,
through a shared-memory segment (``shared_memory="auto"``, the default, tries it for loopback
addresses and falls back to inline if the daemon cannot attach it).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from kvtier_client import shm as shm_mod
from kvtier_client.errors import DeadlineExceededError, KVTierClientError, from_rpc_error
from kvtier_client.shm import abandoned, ranges_back, session_lost
from kvtier_client.staging import new_page, release_page
from kvtier_client.tensors import FetchedPage, Page
from kvtier_client.wire import (
    DEFAULT_CHUNK_BYTES,
    Filler,
    GetAssembler,
    Placement,
    WirePage,
    attach_request,
    copy_in,
    deferred_request,
    get_request,
    inline_bytes,
    lend_in_segment,
    overlapped,
    plan_in_segment,
    put_request,
    put_requests,
    wire_pages,
)
from kvtier_proto.v1 import cache_pb2 as pb
from kvtier_proto.v1 import cache_pb2_grpc as pb_grpc

T = TypeVar("T")

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
]
_LOOPBACK = ("127.", "localhost", "[::1]", "::1", "unix:")
RETRIES = 3
BACKOFF_S = 0.05


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


def lookup_result(r: pb.LookupReply) -> LookupResult:
    return LookupResult(r.prefix_length, tuple(t or None for t in r.tiers))


def cache_stats(r: pb.StatsReply) -> CacheStats:
    return CacheStats(
        tiers=tuple(TierStats(t.name, t.medium, t.codec, t.capacity_bytes, t.high_watermark,
                              t.low_watermark, t.pages, t.bytes, t.hits, t.misses, t.demotions,
                              t.promotions, dict(t.evictions)) for t in r.tiers),
        redis_up=r.redis_up, gets=r.gets, puts=r.puts, policy=r.policy, uptime_s=r.uptime_s,
    )


def is_loopback(target: str) -> bool:
    return target.startswith(_LOOPBACK)


class KVTierClient:
    """Blocking client. Thread-safe; shared-memory transfers are serialized per client.

    ``overlap_copy`` (on by default): a put with at least 256 KiB to copy into the segment
    starts its call first and copies while it is in flight (``shm_fill``); the daemon reads
    each part as soon as it is written, so the client's copy hides behind the call's start.
    Median 2 MiB put on a 2-core host: lending 1263 -> 1155 us, copied by the daemon
    1395 -> 1312 us (see the README). x86-64 only; ignored elsewhere. The copier thread needs
    the GIL between pieces: in a process whose other threads hold it for long stretches (long
    C calls) an overlapped put waits for each piece, so turn it off there.

    ``lend_bytes``: a lend area of that size in the segment (default: a quarter of the
    segment, at most 64 MiB; 0: none). A put whose pages fit there lends them: the daemon keeps
    the pages where they lie, with no copy of its own, and hands each range back (see
    ``kvtier.transport.shm.lend``) when the page leaves the hot tier or is deleted. Only this
    library writes the area. While it is full a put copies as usual and asks the daemon to
    copy the lent pages out in the background, after which puts lend again. The area and its
    return ring (512 KiB) come out of the request area, which bounds how many bytes one get
    can bring back through the segment. The asyncio client takes it too.
    """

    def __init__(self, target: str, namespace: str = "default", *, timeout_s: float = 30.0,
                 shared_memory: bool | str = "auto", shm_bytes: int = 256 << 20,
                 staging_bytes: int = 0, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 overlap_copy: bool = True, lend_bytes: int | None = None,
                 channel: grpc.Channel | None = None) -> None:
        self.target = target
        self.namespace = namespace
        self.timeout_s = timeout_s
        self.chunk_bytes = chunk_bytes
        self.overlap_copy = overlap_copy
        want = shared_memory is True or (shared_memory == "auto" and is_loopback(target))
        self._shm = shm_mod.SessionSlot(want, shm_bytes, target, staging_bytes, lend_bytes)
        self._channel = channel or grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.CacheServiceStub(self._channel)
        self._shm_lock = threading.Lock()
        self._filler = Filler()
        weakref.finalize(self, self._filler.close)  # its thread ends with the client

    # -- plumbing --------------------------------------------------------------------------

    def _call(self, method: str, fn: Callable[[float], T], timeout_s: float | None,
              idempotent: bool) -> T:
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else self.timeout_s)
        attempt = 0
        while True:
            attempt += 1
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceededError("deadline exceeded before the call could be retried",
                                            method=method)
            try:
                return fn(left)
            except grpc.RpcError as e:
                err = from_rpc_error(e, method)
                if (idempotent and err.code == "UNAVAILABLE" and attempt < RETRIES
                        and deadline - time.monotonic() > BACKOFF_S * attempt):
                    time.sleep(BACKOFF_S * attempt)
                    continue
                raise err from None

    def _session(self, namespace: str) -> shm_mod.Session | None:
        """The attached segment for ``namespace`` (caller holds ``_shm_lock``), or None."""
        session, segment = self._shm.current(namespace)
        if segment is None:
            return session
        # The call lives as long as the session (no deadline); only its first answer is timed.
        call = self._stub.AttachShm(attach_request(namespace, segment), timeout=None)
        timer = threading.Timer(self.timeout_s, call.cancel)
        timer.start()
        try:
            reply = next(call)
        except (grpc.RpcError, StopIteration) as e:
            self._shm.failed(segment, call, getattr(e, "details", lambda: repr(e))())
            return None
        finally:
            timer.cancel()
        return self._shm.attached(segment, call, reply.session, namespace)

    def _retire_if_abandoned(self, e: grpc.RpcError) -> None:
        """After a call the daemon may still be serving (deadline passed, cancelled), its
        handler may still read or write the segment: the next call attaches a new one."""
        if abandoned(e):
            self._shm.drop()

    # -- data path -------------------------------------------------------------------------

    def put(self, keys: Sequence[bytes], pages: Sequence[Page | tuple[Any, ...]], *,
            namespace: str | None = None, timeout_s: float | None = None) -> list[str]:
        """Store pages; per key ``"stored"`` or ``"exists"`` (puts are idempotent per key)."""
        ns = namespace or self.namespace
        wire = wire_pages(keys, pages)

        def send(left: float) -> pb.PutReply:
            with self._shm_lock:
                session = self._session(ns)
                if session is not None:
                    try:
                        with session.put_guard():
                            return self._put_shm(session, ns, wire, left)
                    except grpc.RpcError as e:
                        if not session_lost(e):
                            self._retire_if_abandoned(e)
                            raise
                        self._shm.drop()  # daemon ended the session; go inline
            return self._send_put(ns, wire, left)

        reply = self._call("Put", send, timeout_s, idempotent=True)
        return ["stored" if o == pb.PUT_OUTCOME_STORED else "exists" for o in reply.outcomes]

    def _put_shm(self, session: shm_mod.Session, ns: str, wire: Sequence[WirePage],
                 left: float) -> pb.PutReply:
        """A put through the segment. A large one starts its call first and copies while the
        call is in flight (``shm_fill``): the daemon copies each part out as it is written."""
        segment = session.segment
        lent = lend_in_segment(segment, wire)
        if lent is not None:
            return self._lend(session, ns, wire, lent, left)
        plan = plan_in_segment(segment, wire)
        fill = session.next_fill()
        if not (self.overlap_copy and overlapped(plan, wire, self.chunk_bytes)):
            offsets = copy_in(segment, plan, fill)
            return self._send_put(ns, wire, left, session.id, offsets, fill,
                                  segment.wants_reclaim())
        return self._overlapped(segment, plan, fill, put_request(
            ns, wire, session.id, plan.offsets, fill, shm_reclaim=segment.wants_reclaim()), left)

    def _overlapped(self, segment: shm_mod.Segment, plan: Placement, fill: int,
                    req: pb.PutRequest, left: float) -> pb.PutReply:
        """The unary Put ``req``, its bytes copied by the copier thread while it is in flight."""
        segment.start_fill(fill)
        self._filler.start(segment, plan, fill)
        try:
            reply: pb.PutReply = self._stub.Put(req, timeout=left)
        except BaseException:
            self._filler.wait(quiet=True)  # the call's error is the one to report
            raise
        self._filler.wait()  # the segment is not touched again before the fill ended
        return reply

    def _lend(self, session: shm_mod.Session, ns: str, wire: Sequence[WirePage],
              lent: Placement, left: float) -> pb.PutReply:
        """A put whose pages the daemon keeps where they lie (``lend_bytes``). After an error
        the ranges stay taken until the return ring hands them back, which the daemon promises
        with ``RANGES_BACK``; without that promise (the call never reached a handler, or the
        session or ring was unusable) the client starts a new segment."""
        segment = session.segment
        fill = session.next_fill()
        overlap = self.overlap_copy and overlapped(lent, wire, self.chunk_bytes)
        offsets = lent.offsets if overlap else copy_in(segment, lent, fill)
        req = put_request(ns, wire, session.id, offsets, fill,
                          (segment.ring_offset, segment.ring_slots))
        try:
            if overlap:
                return self._overlapped(segment, lent, fill, req, left)
            reply: pb.PutReply = self._stub.Put(req, timeout=left)
        except BaseException as e:
            if not ranges_back(e):  # the ranges may never come back: a new segment
                self._shm.drop()
            raise
        return reply

    def _send_put(self, ns: str, wire: Sequence[WirePage], left: float, session: str = "",
                  offsets: Sequence[int | None] | None = None, fill: int = 0,
                  reclaim: bool = False) -> pb.PutReply:
        """Unary Put when the inline bytes fit one chunk, else the chunked PutStream."""
        reply: pb.PutReply
        if inline_bytes(wire, offsets) <= self.chunk_bytes:
            req = put_request(ns, wire, session, offsets, fill, shm_reclaim=reclaim)
            reply = self._stub.Put(req, timeout=left)
        else:
            reply = self._stub.PutStream(
                put_requests(ns, wire, self.chunk_bytes, session, offsets, fill, reclaim),
                timeout=left)
        return reply

    def staged_page(self, shape: Sequence[int], dtype: str = "float16",
                    start_position: int = 0, *, namespace: str | None = None) -> Page:
        """A page to fill in place and put without a client copy (see
        :mod:`kvtier_client.staging`); needs ``staging_bytes``. ``k`` and ``v`` are numpy
        arrays in the shared-memory segment, or ordinary arrays where there is no session or
        no room. Once ``put`` returned or raised, refill the page for the next key (the
        daemon holds its own copy, or stores nothing for a put that raised; off x86-64,
        release a page whose put raised instead), or give its slot back with
        :meth:`release_page`."""
        with self._shm_lock:
            session = self._session(namespace or self.namespace)
            return new_page(session.segment if session is not None else None,
                            tuple(shape), dtype, start_position)

    def release_page(self, page: Page) -> None:
        """Return a staged page's slot (a no-op for a page in ordinary memory). The page's
        arrays must not be used afterwards: the slot goes to the next staged page."""
        with self._shm_lock:
            release_page(self._shm.session, page)

    def get(self, keys: Sequence[bytes], *, namespace: str | None = None,
            timeout_s: float | None = None,
            as_torch: bool | str = False) -> list[FetchedPage | None]:
        """Fetch pages; ``None`` for a miss. numpy out unless ``as_torch`` (True: CPU tensors;
        a device name such as ``"cuda"``: tensors on that device)."""
        ns = namespace or self.namespace

        def fetch(left: float) -> list[FetchedPage | None]:
            with self._shm_lock:
                session = self._session(ns)
                if session is not None:
                    req = get_request(ns, keys, self.chunk_bytes, session)
                    try:
                        return self._collect(req, left, as_torch, session.segment.view)
                    except grpc.RpcError as e:
                        if not session_lost(e):
                            self._retire_if_abandoned(e)
                            raise
                        self._shm.drop()
            return self._collect(get_request(ns, keys, self.chunk_bytes), left, as_torch, None)

        return self._call("Get", fetch, timeout_s, idempotent=True)

    def _collect(self, req: pb.GetRequest, left: float, as_torch: bool | str,
                 segment: memoryview | None) -> list[FetchedPage | None]:
        """Unary Get; pages it defers (too big for one reply) follow through GetStream."""
        deadline = time.monotonic() + left
        asm = GetAssembler(len(req.keys), as_torch, segment)
        asm.feed(self._stub.Get(req, timeout=left))
        out = asm.result()  # copies shm-placed pages out before the segment is reused
        deferred = asm.deferred
        if deferred:
            again = deferred_request(req, deferred)
            rest = GetAssembler(len(deferred), as_torch, segment)
            for reply in self._stub.GetStream(again, timeout=deadline - time.monotonic()):
                rest.feed(reply)
            for i, page in zip(deferred, rest.result()):
                out[i] = page
        return out

    def lookup(self, keys: Sequence[bytes], *, namespace: str | None = None,
               timeout_s: float | None = None) -> LookupResult:
        req = pb.LookupRequest(namespace=namespace or self.namespace, keys=list(keys))
        return lookup_result(self._call(
            "Lookup", lambda left: self._stub.Lookup(req, timeout=left), timeout_s, True))

    def promote(self, keys: Sequence[bytes], tier: str, *, namespace: str | None = None,
                timeout_s: float | None = None) -> list[bool]:
        req = pb.PromoteRequest(namespace=namespace or self.namespace, keys=list(keys),
                                tier=tier)
        reply = self._call("Promote", lambda left: self._stub.Promote(req, timeout=left),
                           timeout_s, True)
        return list(reply.promoted)

    def delete(self, keys: Sequence[bytes], *, namespace: str | None = None,
               timeout_s: float | None = None) -> int:
        """Remove pages; returns how many were present. Not retried (the count would lie)."""
        req = pb.DeleteRequest(namespace=namespace or self.namespace, keys=list(keys))
        reply = self._call("Delete", lambda left: self._stub.Delete(req, timeout=left),
                           timeout_s, False)
        return int(reply.deleted)

    def stats(self, *, namespace: str | None = None,
              timeout_s: float | None = None) -> CacheStats:
        """Daemon-wide tier statistics."""
        req = pb.StatsRequest(namespace=namespace or self.namespace)
        return cache_stats(self._call(
            "Stats", lambda left: self._stub.Stats(req, timeout=left), timeout_s, True))

    @property
    def uses_shared_memory(self) -> bool:
        return self._shm.session is not None

    def close(self) -> None:
        with self._shm_lock:
            self._shm.drop()
            self._filler.close()
        self._channel.close()

    def __enter__(self) -> KVTierClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["CacheStats", "KVTierClient", "KVTierClientError", "LookupResult", "TierStats"]
