"""The ``kvtier.v1.CacheService`` servicer: validate, convert, call the store, convert back.

Errors are raised as :mod:`kvtier.errors` classes and mapped to status codes by the one
interceptor (:mod:`kvtier.transport.interceptor`); nothing here aborts calls itself. Misses are
``found = false``. Page bytes go inline (chunked streams) or through a same-host shared-memory
session (:mod:`kvtier.transport.shm.session`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from typing import cast

import grpc

from kvtier.errors import Aborted, InvalidArgument, KVTierError, Unauthenticated
from kvtier.pages import PageHeader, check_expected_reuse, check_namespace, check_session
from kvtier.store.results import PutOutcome
from kvtier.transport.cache.convert import PutAssembler, byte_view, check_header, chunks
from kvtier.transport.auth.guard import bearer_token
from kvtier.transport.context import DaemonContext
from kvtier.transport.data.server import DataServer
from kvtier.transport.shm.copy import FILL_TIMEOUT_S, copy_pages, lent_pages
from kvtier.transport.shm.lend import ReturnRing
from kvtier.transport.shm.relocate import Relocator
from kvtier.transport.shm.session import ShmRegistry, ShmSession
from kvtier.types import Namespace, Page, PageId
from kvtier_client.shm_layout import RANGES_BACK, TOKEN_BYTES, align_up
from kvtier_proto.v1 import cache_pb2 as pb
from kvtier_proto.v1 import cache_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 1 << 20
MAX_CHUNK_BYTES = 16 << 20
MIN_CHUNK_BYTES = 4 << 10
_PUT_OUTCOME = {PutOutcome.STORED: pb.PUT_OUTCOME_STORED, PutOutcome.EXISTS: pb.PUT_OUTCOME_EXISTS}


class CacheServicer(pb_grpc.CacheServiceServicer):  # type: ignore[misc]
    """Thin adapter from the wire to :class:`kvtier.store.store.TierStore`."""

    def __init__(self, ctx: DaemonContext, shm: ShmRegistry, relocator: Relocator,
                 data: DataServer | None = None) -> None:
        self._ctx = ctx
        self._data = data
        self._store = ctx.store
        self._settings = ctx.settings
        self._shm = shm
        self._relocator = relocator
        shm.on_end(self._session_ended)

    def _session_ended(self, session: ShmSession) -> None:
        if session.lends:  # pages it lent may outlive it: copy them out
            self._relocator.submit(session)

    # -- data path -------------------------------------------------------------------------

    def Put(self, request: pb.PutRequest, context: grpc.ServicerContext) -> pb.PutReply:
        lent = [False]
        try:
            return self._put((request,), context, lent)
        except BaseException:
            if request.shm_ring_slots:
                self._lent_ranges_back(request, context, lent[0])
            raise

    def PutStream(self, request_iterator: Iterator[pb.PutRequest],
                  context: grpc.ServicerContext) -> pb.PutReply:
        return self._put(request_iterator, context, [False])

    def _put(self, requests: Iterable[pb.PutRequest], context: grpc.ServicerContext,
             lent: list[bool]) -> pb.PutReply:
        outcomes = self._store_pages(requests, context, lent)
        return pb.PutReply(outcomes=[_PUT_OUTCOME[o] for o in outcomes])

    def _lent_ranges_back(self, request: pb.PutRequest, context: grpc.ServicerContext,
                          lent: bool) -> None:
        """A lending put failed: see that each range it names goes back through the return
        ring exactly once, and tell the client so (``RANGES_BACK``), so it keeps its segment.
        Ranges that were lent come back by themselves when their arrays die; the others are
        handed back here. Without a usable session and ring nothing can go back: no mark."""
        if not lent:
            try:
                session = self._shm.get(request.shm_session)
                session.check_owner(request.namespace)
                ring = session.ring(request.shm_ring_offset, request.shm_ring_slots)
            except KVTierError:
                return
            offsets = [h.shm_offset for h in request.pages if h.HasField("shm_offset")]
            if not ring.hand_back(offsets):
                return
        context.set_trailing_metadata(((RANGES_BACK, "1"),))

    def _store_pages(self, requests: Iterable[pb.PutRequest], context: grpc.ServicerContext,
                     lent: list[bool]) -> list[PutOutcome]:
        """Check every header once, build the pages (inline ones from the stream, shm ones
        copied out of the segment once the headers are all known) and store them; every page
        is the daemon's own memory by then, so the store adopts it without a copy. ``lent[0]``
        is set once the segment's ranges are lent (from then on they come back by themselves)."""
        namespace: Namespace | None = None
        session_id = ""
        hint_session = ""
        fill = ring_offset = ring_slots = 0
        reclaim = False
        ring: ReturnRing | None = None
        session: ShmSession | None = None
        pids: list[PageId] = []
        chains: list[int | None] = []
        reuse: list[float | None] = []
        pages: list[Page | None] = []
        inline_idx: list[int] = []
        shm_idx: list[int] = []
        shm_headers: list[PageHeader] = []
        assembler = PutAssembler(self._settings, self._ctx.buffers)
        for req in requests:
            if namespace is None:
                namespace = check_namespace(req.namespace)
                session_id, fill, reclaim = req.shm_session, req.shm_fill, req.shm_reclaim
                ring_offset, ring_slots = req.shm_ring_offset, req.shm_ring_slots
                hint_session = check_session(req.session)
            elif req.namespace and req.namespace != namespace:
                raise InvalidArgument("namespace changed within one put stream",
                                      field="namespace")
            if len(pids) + len(req.pages) > self._settings.max_batch:
                raise InvalidArgument(
                    f"{len(pids) + len(req.pages)} pages in one call, more than the maximum "
                    f"batch of {self._settings.max_batch}", field="pages"
                )
            for raw_header in req.pages:
                h = check_header(raw_header, self._settings)
                pids.append(PageId(namespace, h.key))
                chains.append(h.chain_position)
                reuse.append(check_expected_reuse(raw_header.expected_reuse_s)
                             if raw_header.HasField("expected_reuse_s") else None)
                (inline_idx if h.shm_offset is None else shm_idx).append(len(pages))
                pages.append(None)
                if h.shm_offset is None:
                    assembler.add_headers([h])
                    continue
                if not session_id:
                    raise InvalidArgument("shm_offset set without an shm_session",
                                          field="shm_offset")
                if session is None:
                    session = self._shm.get(session_id)
                    session.check_owner(namespace)
                session.check_range(h.shm_offset, 2 * h.nbytes, "shm_offset")
                shm_headers.append(h)
            if req.data:
                assembler.feed(req.data)
        if namespace is None or not pids:
            raise InvalidArgument("the page list is empty", field="pages")
        assembler.finish()
        if len(set(pids)) != len(pids):  # refused before any shm work
            raise InvalidArgument("the same key appears twice in one put", field="keys")
        if any(c is None for c in chains):  # the store's default: positions in the batch
            chains = list(range(len(pids)))
        for i, (_, page) in zip(inline_idx, assembler.pages):
            pages[i] = page
        if session is not None:
            left = context.time_remaining()
            ring = session.ring(ring_offset, ring_slots) if ring_slots else None
            wait_s = FILL_TIMEOUT_S if left is None else left  # the bytes may come late
            with session.use(namespace) as seg:
                if not context.is_active():  # the client gave up: its segment is not ours
                    raise Aborted("the call ended before its shared-memory bytes were read",
                                  field="shm_session")
                if ring is not None:  # kept where they lie; no copy
                    ring.check_lend([(cast(int, h.shm_offset), 2 * h.nbytes)
                                     for h in shm_headers])
                    lent[0] = True
                    copied = lent_pages(seg, ring, shm_headers, fill, session.ended, wait_s)
                    ring.flush()
                else:
                    copied = copy_pages(seg, shm_headers, fill, session.ended,
                                        self._ctx.buffers, wait_s)
            for i, page in zip(shm_idx, copied):
                pages[i] = page
            if reclaim:  # the client's lend area is full
                self._relocator.submit(session)
        outcomes = self._store.put_checked(
            pids, cast(list[Page], pages), cast(list[int], chains), owned=True,
            session=hint_session,
            expected_reuse_s=reuse if any(r is not None for r in reuse) else None)
        if ring is not None and session is not None:
            for i, h in zip(shm_idx, shm_headers):
                if outcomes[i] is PutOutcome.STORED:
                    ring.note_stored(cast(int, h.shm_offset), pids[i])
            if session.ended.is_set():  # it ended while this put lent: copy those out
                self._relocator.submit(session)
        return outcomes

    def Get(self, request: pb.GetRequest, context: grpc.ServicerContext) -> pb.GetReply:
        results, inline = self._gather(request, context, unary=True)
        return pb.GetReply(pages=results, data=b"".join(inline))

    def GetStream(self, request: pb.GetRequest,
                  context: grpc.ServicerContext) -> Iterator[pb.GetReply]:
        results, inline = self._gather(request, context, unary=False)
        data = chunks(inline, self._chunk(request))
        yield pb.GetReply(pages=results, data=next(data, b""))
        for piece in data:
            yield pb.GetReply(data=piece)

    @staticmethod
    def _chunk(request: pb.GetRequest) -> int:
        chunk = request.chunk_bytes or DEFAULT_CHUNK_BYTES
        if not MIN_CHUNK_BYTES <= chunk <= MAX_CHUNK_BYTES:
            raise InvalidArgument(
                f"chunk_bytes must be within {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES}, got {chunk}",
                field="chunk_bytes",
            )
        return chunk

    def _gather(self, request: pb.GetRequest, context: grpc.ServicerContext,
                unary: bool) -> tuple[list[pb.PageResult], list[memoryview]]:
        """Read the pages, place what fits into the shm segment; the rest goes inline.

        ``unary``: inline bytes are capped at ``chunk_bytes``; pages beyond are ``deferred``.
        """
        pids = self._store.check_keys(request.namespace, request.keys)
        budget = self._chunk(request) if unary else None
        session = self._shm.get(request.shm_session) if request.shm_session else None
        if session is not None:  # refuse before reading anything
            session.check_owner(request.namespace)
            session.check_range(request.shm_offset, request.shm_capacity, "shm_capacity")
        raws = self._store.get_raw_checked(pids)
        results: list[pb.PageResult] = []
        inline: list[memoryview] = []
        inline_bytes = 0
        placed: list[tuple[int, memoryview, memoryview]] = []
        cursor = request.shm_offset
        end = request.shm_offset + request.shm_capacity
        for i, raw in enumerate(raws):
            if raw is None:
                results.append(pb.PageResult(index=i, found=False))
                continue
            k, v = byte_view(raw.k), byte_view(raw.v)
            size = k.nbytes + v.nbytes
            r = pb.PageResult(index=i, found=True, dtype=raw.dtype, shape=list(raw.shape),
                              start_position=raw.start_position, tier=raw.tier,
                              precision=int(raw.precision), k_len=k.nbytes, v_len=v.nbytes)
            if session is not None and cursor + size <= end:
                r.shm_offset = cursor
                placed.append((cursor, k, v))
                cursor = align_up(cursor + size)
            elif budget is not None and inline_bytes + size > budget:
                r.deferred = True
            else:
                inline += [k, v]
                inline_bytes += size
            results.append(r)
        if session is not None and placed:
            with session.use(request.namespace) as seg:
                if not context.is_active():  # the client gave up and may reuse its segment
                    raise Aborted("the call ended before its pages were written",
                                  field="shm_session")
                for off, k, v in placed:
                    seg[off:off + k.nbytes] = k
                    seg[off + k.nbytes:off + k.nbytes + v.nbytes] = v
        return results, inline

    def Lookup(self, request: pb.LookupRequest,
               context: grpc.ServicerContext) -> pb.LookupReply:
        res = self._store.lookup_checked(self._store.check_keys(request.namespace, request.keys),
                                         session=check_session(request.session),
                                         prefetch=request.prefetch)
        return pb.LookupReply(prefix_length=res.prefix_length,
                              tiers=[t or "" for t in res.tiers])

    def Hint(self, request: pb.HintRequest, context: grpc.ServicerContext) -> pb.HintReply:
        queued = [list(c.keys) for c in request.queued]
        return pb.HintReply(prefetching=self._store.hint(request.namespace, queued,
                                                          list(request.ended_sessions)))

    def Promote(self, request: pb.PromoteRequest,
                context: grpc.ServicerContext) -> pb.PromoteReply:
        pids = self._store.check_keys(request.namespace, request.keys)
        return pb.PromoteReply(promoted=self._store.promote_checked(pids, request.tier))

    def Delete(self, request: pb.DeleteRequest,
               context: grpc.ServicerContext) -> pb.DeleteReply:
        pids = self._store.check_keys(request.namespace, request.keys)
        return pb.DeleteReply(deleted=self._store.delete_checked(pids))

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsReply:
        if request.namespace:
            check_namespace(request.namespace)
        s = self._store.stats()
        tiers = [
            pb.TierStats(
                name=t.name, medium=str(getattr(t.medium, "value", t.medium)),
                codec=str(getattr(t.codec, "value", t.codec)),
                capacity_bytes=t.capacity_bytes, high_watermark=t.high_watermark,
                low_watermark=t.low_watermark, pages=t.pages, bytes=t.bytes, hits=t.hits,
                misses=t.misses, demotions=t.demotions, promotions=t.promotions,
                evictions={str(k): int(n) for k, n in dict(t.evictions).items()},
            )
            for t in s.tiers
        ]
        policy = getattr(s.policy, "name", None) or type(self._store.policy).__name__
        return pb.StatsReply(tiers=tiers, redis_up=bool(s.redis_up), gets=int(s.gets),
                             puts=int(s.puts), policy=str(policy),
                             uptime_s=time.time() - self._ctx.started_at,
                             prefetched=int(s.prefetched), prefetch_hits=int(s.prefetch_hits))

    # -- data channel ----------------------------------------------------------------------

    def OpenData(self, request: pb.OpenDataRequest,
                 context: grpc.ServicerContext) -> pb.OpenDataReply:
        namespace = check_namespace(request.namespace)
        data = self._data
        if data is None:
            return pb.OpenDataReply(port=0)
        writable, token = request.writable, None
        tokens = self._ctx.tokens
        if tokens is not None:  # the guard checked the token and the namespace already
            token = bearer_token(context.invocation_metadata())
            grant = tokens.grant(token) if token is not None else None
            if grant is None or not grant.allows(namespace, write=False):
                raise Unauthenticated("the token is not valid (unknown or revoked)",
                                      field="authorization")
            writable = writable and not grant.read_only
        return pb.OpenDataReply(ticket=data.open(namespace, writable, token), port=data.port,
                                tls=data.tls,
                                max_frame_bytes=self._settings.data.max_frame_bytes,
                                ticket_ttl_s=self._settings.data.ticket_ttl_s,
                                writable=writable)

    # -- shared memory ---------------------------------------------------------------------

    def AttachShm(self, request: pb.AttachShmRequest,
                  context: grpc.ServicerContext) -> Iterator[pb.AttachShmReply]:
        namespace = check_namespace(request.namespace)
        if len(request.token) != TOKEN_BYTES:
            raise InvalidArgument(f"token must be {TOKEN_BYTES} bytes", field="token")
        session = self._shm.attach(namespace, request.path, request.size, request.token)
        done = threading.Event()
        context.add_callback(done.set)
        try:
            yield pb.AttachShmReply(session=session.session_id)
            while not done.wait(0.5) and not session.ended.is_set() and context.is_active():
                pass
        finally:
            self._shm.detach(session.session_id)
            if session.lends:  # pages it lent may outlive it: copy them out
                self._relocator.submit(session)

    def OpenShm(self, request: pb.AttachShmRequest,
                context: grpc.ServicerContext) -> pb.ShmLeaseReply:
        namespace = check_namespace(request.namespace)
        if len(request.token) != TOKEN_BYTES:
            raise InvalidArgument(f"token must be {TOKEN_BYTES} bytes", field="token")
        lease_s = self._settings.limits.shm_lease_s
        session = self._shm.attach(namespace, request.path, request.size, request.token,
                                   lease_s=lease_s)
        return pb.ShmLeaseReply(session=session.session_id, lease_s=lease_s)

    def RenewShm(self, request: pb.ShmLeaseRequest,
                 context: grpc.ServicerContext) -> pb.ShmLeaseReply:
        session = self._shm.renew(request.session, check_namespace(request.namespace))
        return pb.ShmLeaseReply(session=session.session_id, lease_s=session.lease_s or 0.0)

    def CloseShm(self, request: pb.ShmLeaseRequest,
                 context: grpc.ServicerContext) -> pb.ShmLeaseReply:
        namespace = check_namespace(request.namespace)
        session = self._shm.get(request.session)
        session.check_owner(namespace)
        if self._shm.detach(session.session_id) is not None:
            self._session_ended(session)
        return pb.ShmLeaseReply(session=session.session_id)
