"""The asyncio client: :class:`AsyncKVTierClient`, same calls as the sync one, awaited.

Page bytes travel as in the sync client: through a shared-memory segment when the daemon is on
this host (``shared_memory="auto"``, the default, tries it for loopback addresses and falls back
to inline gRPC if the daemon cannot attach it or ends the session), else inline in chunked gRPC
streams. Retries and deadlines follow the same rules as :mod:`kvtier_client.client`.
Transfers through the segment are serialized per client by an :class:`asyncio.Lock`; the
copies into and out of the segment run on the event loop (a memcpy, ~0.1 ms per MiB here).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
import grpc.aio

from kvtier_client import shm as shm_mod
from kvtier_client.client import (
    BACKOFF_S,
    CHANNEL_OPTIONS,
    RETRIES,
    CacheStats,
    LookupResult,
    cache_stats,
    is_loopback,
    lookup_result,
)
from kvtier_client.errors import DeadlineExceededError, from_rpc_error
from kvtier_client.shm import abandoned, ranges_back, session_lost
from kvtier_client.staging import new_page, release_page
from kvtier_client.tensors import FetchedPage, Page
from kvtier_client.wire import (
    DEFAULT_CHUNK_BYTES,
    GetAssembler,
    Placement,
    WirePage,
    attach_request,
    copy_in,
    deferred_request,
    fill_segment,
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


class AsyncKVTierClient:
    """asyncio client; create it inside a running event loop."""

    def __init__(self, target: str, namespace: str = "default", *, timeout_s: float = 30.0,
                 shared_memory: bool | str = "auto", shm_bytes: int = 256 << 20,
                 staging_bytes: int = 0, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 overlap_copy: bool = True, lend_bytes: int | None = None) -> None:
        self.target = target
        self.namespace = namespace
        self.timeout_s = timeout_s
        self.chunk_bytes = chunk_bytes
        self.overlap_copy = overlap_copy
        want = shared_memory is True or (shared_memory == "auto" and is_loopback(target))
        self._shm = shm_mod.SessionSlot(want, shm_bytes, target, staging_bytes, lend_bytes)
        self._channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.CacheServiceStub(self._channel)
        self._shm_lock = asyncio.Lock()

    async def _call(self, method: str, fn: Callable[[float], Awaitable[T]],
                    timeout_s: float | None, idempotent: bool) -> T:
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else self.timeout_s)
        attempt = 0
        while True:
            attempt += 1
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceededError("deadline exceeded before the call could be retried",
                                            method=method)
            try:
                return await fn(left)
            except grpc.RpcError as e:
                err = from_rpc_error(e, method)
                if (idempotent and err.code == "UNAVAILABLE" and attempt < RETRIES
                        and deadline - time.monotonic() > BACKOFF_S * attempt):
                    await asyncio.sleep(BACKOFF_S * attempt)
                    continue
                raise err from None

    async def _session(self, namespace: str) -> shm_mod.Session | None:
        """The attached segment for ``namespace`` (caller holds ``_shm_lock``), or None."""
        session, segment = self._shm.current(namespace)
        if segment is None:
            return session
        # The call lives as long as the session (no deadline); only its first answer is timed.
        call = self._stub.AttachShm(attach_request(namespace, segment), timeout=None)
        try:
            reply = await asyncio.wait_for(call.read(), self.timeout_s)
        except (grpc.RpcError, asyncio.TimeoutError) as e:
            self._shm.failed(segment, call, e.details() if isinstance(e, grpc.RpcError)
                             else "no answer within the client's timeout")
            return None
        if reply is grpc.aio.EOF:  # type: ignore[attr-defined]  # missing from grpc-stubs
            self._shm.failed(segment, call, "AttachShm ended without a session")
            return None
        return self._shm.attached(segment, call, reply.session, namespace)

    def _retire_if_abandoned(self, e: grpc.RpcError) -> None:
        """As :meth:`KVTierClient._retire_if_abandoned`: a new segment after an abandoned call."""
        if abandoned(e):
            self._shm.drop()

    async def put(self, keys: Sequence[bytes], pages: Sequence[Page | tuple[Any, ...]], *,
                  namespace: str | None = None, timeout_s: float | None = None) -> list[str]:
        """Store pages; per key ``"stored"`` or ``"exists"`` (puts are idempotent per key)."""
        ns = namespace or self.namespace
        wire = wire_pages(keys, pages)

        async def send(left: float) -> pb.PutReply:
            async with self._shm_lock:
                session = await self._session(ns)
                if session is not None:
                    try:
                        with session.put_guard():
                            return await self._put_shm(session, ns, wire, left)
                    except grpc.RpcError as e:
                        if not session_lost(e):
                            self._retire_if_abandoned(e)
                            raise
                        self._shm.drop()  # daemon ended the session; go inline
            return await self._send_put(ns, wire, left)

        reply = await self._call("Put", send, timeout_s, True)
        return ["stored" if o == pb.PUT_OUTCOME_STORED else "exists" for o in reply.outcomes]

    async def _put_shm(self, session: shm_mod.Session, ns: str, wire: Sequence[WirePage],
                       left: float) -> pb.PutReply:
        """As :meth:`KVTierClient._put_shm`: a large put yields once so its call goes out,
        then copies (blocking the loop no longer than the copy always did)."""
        segment = session.segment
        lent = lend_in_segment(segment, wire)
        if lent is not None:  # as KVTierClient._lend
            fill = session.next_fill()
            overlap = self.overlap_copy and overlapped(lent, wire, self.chunk_bytes)
            offsets = lent.offsets if overlap else copy_in(segment, lent, fill)
            req = put_request(ns, wire, session.id, offsets, fill,
                              (segment.ring_offset, segment.ring_slots))
            try:
                if overlap:
                    return await self._overlapped(segment, lent, fill, req, left)
                lent_reply: pb.PutReply = await self._stub.Put(req, timeout=left)
            except BaseException as e:  # a cancel too
                if not ranges_back(e):
                    self._shm.drop()
                raise
            return lent_reply
        plan = plan_in_segment(segment, wire)
        fill = session.next_fill()
        if not (self.overlap_copy and overlapped(plan, wire, self.chunk_bytes)):
            offsets = copy_in(segment, plan, fill)
            return await self._send_put(ns, wire, left, session.id, offsets, fill,
                                        segment.wants_reclaim())
        return await self._overlapped(segment, plan, fill, put_request(
            ns, wire, session.id, plan.offsets, fill, shm_reclaim=segment.wants_reclaim()), left)

    async def _overlapped(self, segment: shm_mod.Segment, plan: Placement, fill: int,
                          req: pb.PutRequest, left: float) -> pb.PutReply:
        """The unary Put ``req``, its bytes copied here once the call went out."""
        segment.start_fill(fill)
        call = self._stub.Put(req, timeout=left)
        await asyncio.sleep(0)  # lets the call's task send the request
        try:
            fill_segment(segment, plan, fill)
        except BaseException:
            call.cancel()
            raise
        reply: pb.PutReply = await call
        return reply

    async def _send_put(self, ns: str, wire: Sequence[WirePage], left: float,
                        session: str = "", offsets: Sequence[int | None] | None = None,
                        fill: int = 0, reclaim: bool = False) -> pb.PutReply:
        """Unary Put when the inline bytes fit one chunk, else the chunked PutStream."""
        reply: pb.PutReply
        if inline_bytes(wire, offsets) <= self.chunk_bytes:
            req = put_request(ns, wire, session, offsets, fill, shm_reclaim=reclaim)
            reply = await self._stub.Put(req, timeout=left)
        else:
            reply = await self._stub.PutStream(
                put_requests(ns, wire, self.chunk_bytes, session, offsets, fill, reclaim),
                timeout=left)
        return reply

    async def staged_page(self, shape: Sequence[int], dtype: str = "float16",
                          start_position: int = 0, *, namespace: str | None = None) -> Page:
        """As :meth:`KVTierClient.staged_page`: a page in the segment's staging area."""
        async with self._shm_lock:
            session = await self._session(namespace or self.namespace)
            return new_page(session.segment if session is not None else None,
                            tuple(shape), dtype, start_position)

    async def release_page(self, page: Page) -> None:
        """As :meth:`KVTierClient.release_page`."""
        async with self._shm_lock:
            release_page(self._shm.session, page)

    async def get(self, keys: Sequence[bytes], *, namespace: str | None = None,
                  timeout_s: float | None = None,
                  as_torch: bool | str = False) -> list[FetchedPage | None]:
        """Fetch pages; ``None`` for a miss. numpy out unless ``as_torch`` (True: CPU tensors;
        a device name such as ``"cuda"``: tensors on that device)."""
        ns = namespace or self.namespace

        async def fetch(left: float) -> list[FetchedPage | None]:
            async with self._shm_lock:
                session = await self._session(ns)
                if session is not None:
                    req = get_request(ns, keys, self.chunk_bytes, session)
                    try:
                        return await self._collect(req, left, as_torch, session.segment.view)
                    except grpc.RpcError as e:
                        if not session_lost(e):
                            self._retire_if_abandoned(e)
                            raise
                        self._shm.drop()
            return await self._collect(get_request(ns, keys, self.chunk_bytes), left, as_torch,
                                       None)

        return await self._call("Get", fetch, timeout_s, True)

    async def _collect(self, req: pb.GetRequest, left: float, as_torch: bool | str,
                       segment: memoryview | None) -> list[FetchedPage | None]:
        """Unary Get; pages it defers (too big for one reply) follow through GetStream."""
        deadline = time.monotonic() + left
        asm = GetAssembler(len(req.keys), as_torch, segment)
        asm.feed(await self._stub.Get(req, timeout=left))
        out = asm.result()  # copies shm-placed pages out before the segment is reused
        deferred = asm.deferred
        if deferred:
            rest = GetAssembler(len(deferred), as_torch, segment)
            async for reply in self._stub.GetStream(deferred_request(req, deferred),
                                                    timeout=deadline - time.monotonic()):
                rest.feed(reply)
            for i, page in zip(deferred, rest.result()):
                out[i] = page
        return out

    async def lookup(self, keys: Sequence[bytes], *, namespace: str | None = None,
                     timeout_s: float | None = None) -> LookupResult:
        req = pb.LookupRequest(namespace=namespace or self.namespace, keys=list(keys))

        async def call(left: float) -> pb.LookupReply:
            reply: pb.LookupReply = await self._stub.Lookup(req, timeout=left)
            return reply

        return lookup_result(await self._call("Lookup", call, timeout_s, True))

    async def promote(self, keys: Sequence[bytes], tier: str, *, namespace: str | None = None,
                      timeout_s: float | None = None) -> list[bool]:
        req = pb.PromoteRequest(namespace=namespace or self.namespace, keys=list(keys),
                                tier=tier)

        async def call(left: float) -> pb.PromoteReply:
            reply: pb.PromoteReply = await self._stub.Promote(req, timeout=left)
            return reply

        return list((await self._call("Promote", call, timeout_s, True)).promoted)

    async def delete(self, keys: Sequence[bytes], *, namespace: str | None = None,
                     timeout_s: float | None = None) -> int:
        req = pb.DeleteRequest(namespace=namespace or self.namespace, keys=list(keys))

        async def call(left: float) -> pb.DeleteReply:
            reply: pb.DeleteReply = await self._stub.Delete(req, timeout=left)
            return reply

        return int((await self._call("Delete", call, timeout_s, False)).deleted)

    async def stats(self, *, namespace: str | None = None,
                    timeout_s: float | None = None) -> CacheStats:
        req = pb.StatsRequest(namespace=namespace or self.namespace)

        async def call(left: float) -> pb.StatsReply:
            reply: pb.StatsReply = await self._stub.Stats(req, timeout=left)
            return reply

        return cache_stats(await self._call("Stats", call, timeout_s, True))

    @property
    def uses_shared_memory(self) -> bool:
        return self._shm.session is not None

    async def close(self) -> None:
        async with self._shm_lock:
            session = self._shm.session
            self._shm.drop()
            if session is not None:  # the cancelled AttachShm call ends before the channel
                await session.call.code()
        await self._channel.close(None)

    async def __aenter__(self) -> AsyncKVTierClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
