"""The asyncio client: :class:`AsyncKVTierClient`, same calls as the sync one, awaited.

Page bytes travel as in the sync client: through a shared-memory segment when the daemon is on
this host (``shared_memory="auto"``, the default, tries it for loopback addresses and falls back
if the daemon cannot attach it or ends the session), else over the data channel
(:mod:`kvtier_client.data`; its blocking socket work runs on a worker thread), else inline in
chunked gRPC streams. Retries and deadlines follow the same rules
(:class:`kvtier_client.core.Attempts`).
Transfers through the segment are serialized per client by an :class:`asyncio.Lock`; the
copies into and out of the segment run on the event loop (a memcpy, ~0.1 ms per MiB).

A thin driver over :mod:`kvtier_client.core`, like :class:`~kvtier_client.client.KVTierClient`:
the core plans each call, this class awaits it.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
import grpc.aio

from kvtier_client import core
from kvtier_client import shm as shm_mod
from kvtier_client.credentials import with_token
from kvtier_client.core import DEFAULT_CHUNK_BYTES, CacheStats, LookupResult
from kvtier_client.data import DataChannel, DataConn, put_parts
from kvtier_client.errors import KVTierClientError
from kvtier_client.staging import new_page, release_page
from kvtier_client.tensors import FetchedPage, Page
from kvtier_client.tls import channel_credentials, data_ssl_context
from kvtier_proto.v1 import cache_pb2 as pb
from kvtier_proto.v1 import cache_pb2_grpc as pb_grpc

T = TypeVar("T")


class AsyncKVTierClient:
    """asyncio client; create it inside a running event loop."""

    def __init__(self, target: str, namespace: str = "default", *, timeout_s: float = 30.0,
                 shared_memory: bool | str = "auto", shm_bytes: int = 256 << 20,
                 staging_bytes: int = 0, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 overlap_copy: bool = True, lend_bytes: int | None = None,
                 token: str | None = None, data_channel: bool = True,
                 data_ssl: ssl.SSLContext | None = None,
                 tls_ca_file: str | None = None, tls_cert_file: str | None = None,
                 tls_key_file: str | None = None) -> None:
        self.target = target
        self.namespace = namespace
        self.timeout_s = timeout_s
        self.chunk_bytes = chunk_bytes
        self.overlap_copy = overlap_copy
        self._shm = shm_mod.SessionSlot(core.wants_shared_memory(shared_memory, target),
                                        shm_bytes, target, staging_bytes, lend_bytes)
        creds = channel_credentials(tls_ca_file, tls_cert_file, tls_key_file)
        self._channel = (
            grpc.aio.insecure_channel(target, options=core.CHANNEL_OPTIONS) if creds is None
            else grpc.aio.secure_channel(target, creds, options=core.CHANNEL_OPTIONS))
        self._stub = with_token(pb_grpc.CacheServiceStub(self._channel), token)
        if data_ssl is None:  # the data channel speaks TLS with the same files
            data_ssl = data_ssl_context(tls_ca_file, tls_cert_file, tls_key_file)
        self._shm_lock = asyncio.Lock()
        self._data = DataChannel(data_channel, target, data_ssl)

    async def _call(self, method: str, fn: Callable[[float], Awaitable[T]],
                    timeout_s: float | None, idempotent: bool) -> T:
        """Await ``fn(seconds left)`` under the retry rule (``core.Attempts``)."""
        attempts = core.Attempts(method, self.timeout_s if timeout_s is None else timeout_s,
                                 idempotent)
        while True:
            left = attempts.start()
            try:
                return await fn(left)
            except (grpc.RpcError, KVTierClientError) as e:
                await asyncio.sleep(attempts.failed(e))

    async def _session(self, namespace: str) -> shm_mod.Session | None:
        """The attached segment for ``namespace`` (caller holds ``_shm_lock``), or None."""
        session, segment = self._shm.current(namespace)
        if segment is None:
            return session
        # A lease: no call stays open; a task renews it while the client is idle.
        try:
            reply = await self._stub.OpenShm(core.attach_request(namespace, segment),
                                             timeout=self.timeout_s)
        except grpc.RpcError as e:
            self._shm.failed(segment, None, e.details())
            return None
        lease = AsyncLease(self._stub, namespace, reply.session, reply.lease_s)
        return self._shm.attached(segment, lease, reply.session, namespace)

    async def put(self, keys: Sequence[bytes], pages: Sequence[Page | tuple[Any, ...]], *,
                  namespace: str | None = None, timeout_s: float | None = None,
                  session: str = "") -> list[str]:
        """Store pages; per key ``"stored"`` or ``"exists"`` (puts are idempotent per key).
        ``session``: the conversation/session they belong to (a hint for the policy)."""
        ns = namespace or self.namespace
        wire = core.wire_pages(keys, pages)
        hint_session = session

        async def send(left: float) -> pb.PutReply:
            async with self._shm_lock:
                session = await self._session(ns)
                if session is not None:
                    plan: core.PutPlan | None = None
                    try:
                        with session.put_guard():
                            plan = core.plan_put(ns, wire, session, self.chunk_bytes,
                                                 self.overlap_copy)
                            return await self._send(core.with_session(plan, hint_session),
                                                    left)
                    except BaseException as e:  # a cancel too
                        if not core.put_failed(self._shm, plan, e):
                            raise
            if self._data.usable and not hint_session:  # data frames carry no session hint
                conn = await self._data_conn(ns, left)
                if conn is not None:
                    headers, parts, _ = put_parts(wire)
                    reply = await asyncio.to_thread(self._data.put_on, conn, headers, parts,
                                                    left)
                    if reply is not None:
                        return reply
            return await self._send(core.with_session(
                core.plan_put(ns, wire, None, self.chunk_bytes, False), hint_session), left)

        return core.put_outcomes(await self._call("Put", send, timeout_s, True))

    async def _data_conn(self, namespace: str, left: float) -> DataConn | None:
        """As :meth:`KVTierClient._data_conn`; the blocking connect runs on a thread. Page
        bytes move on a thread too (``DataChannel.put_on`` / ``get_on``), which gives the
        connection back itself, so a cancelled call never hands back a connection in use."""
        conn = self._data.take(namespace)
        if conn is not None:
            return conn
        try:
            reply = await self._stub.OpenData(self._data.open_request(namespace), timeout=left)
        except grpc.RpcError as e:
            if self._data.open_failed(e.code().name):
                return None
            raise
        return await asyncio.to_thread(self._data.connect, namespace, reply, left)

    async def _send(self, plan: core.PutPlan, left: float) -> pb.PutReply:
        reply: pb.PutReply
        if plan.overlap is not None:  # copied here once the call went out
            assert plan.segment is not None and plan.request is not None
            plan.segment.start_fill(plan.fill)
            call = self._stub.Put(plan.request, timeout=left)
            await asyncio.sleep(0)  # lets the call's task send the request
            try:
                core.fill_segment(plan.segment, plan.overlap, plan.fill)
            except BaseException:
                call.cancel()
                raise
            reply = await call
        elif plan.request is not None:
            reply = await self._stub.Put(plan.request, timeout=left)
        else:
            reply = await self._stub.PutStream(plan.stream(), timeout=left)
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
                    req = core.get_request(ns, keys, self.chunk_bytes, session)
                    try:
                        return await self._collect(req, left, as_torch, session.segment.view)
                    except grpc.RpcError as e:
                        if not core.call_failed(self._shm, e):
                            raise
            if self._data.usable:
                conn = await self._data_conn(ns, left)
                if conn is not None:
                    return await asyncio.to_thread(self._data.get_on, conn, keys, left,
                                                   as_torch)
            req = core.get_request(ns, keys, self.chunk_bytes)
            return await self._collect(req, left, as_torch, None)

        return await self._call("Get", fetch, timeout_s, True)

    async def _collect(self, req: pb.GetRequest, left: float, as_torch: bool | str,
                       segment: memoryview | None) -> list[FetchedPage | None]:
        pages = core.GetCollector(req, left, as_torch, segment)
        again = pages.first(await self._stub.Get(req, timeout=left))
        if again is not None:
            async for reply in self._stub.GetStream(again, timeout=pages.time_left()):
                pages.more(reply)
        return pages.result()

    async def lookup(self, keys: Sequence[bytes], *, namespace: str | None = None,
                     timeout_s: float | None = None, session: str = "",
                     prefetch: bool = False) -> LookupResult:
        """How long a prefix of the key chain ``keys`` is present, and where. ``session``
        names the request's conversation (a hint); ``prefetch`` has the daemon start moving
        the present prefix up from lower tiers now, ahead of the get."""
        req = core.lookup_request(namespace or self.namespace, keys, session, prefetch)

        async def call(left: float) -> pb.LookupReply:
            reply: pb.LookupReply = await self._stub.Lookup(req, timeout=left)
            return reply

        return core.lookup_result(await self._call("Lookup", call, timeout_s, True))

    async def hint(self, queued: Sequence[Sequence[bytes]] = (), *,
                   ended_sessions: Sequence[str] = (), namespace: str | None = None,
                   timeout_s: float | None = None) -> int:
        """Tell the daemon what this worker knows ahead: ``queued``, the key chains of the
        requests waiting to be scheduled (next first; replaces the queue hinted before), and
        sessions that ended. The queued chains' present prefixes are promoted ahead of use;
        returns how many pages that scheduled. Advisory: safe to repeat."""
        req = core.hint_request(namespace or self.namespace, queued, ended_sessions)

        async def call(left: float) -> pb.HintReply:
            reply: pb.HintReply = await self._stub.Hint(req, timeout=left)
            return reply

        return int((await self._call("Hint", call, timeout_s, True)).prefetching)

    async def promote(self, keys: Sequence[bytes], tier: str, *, namespace: str | None = None,
                      timeout_s: float | None = None) -> list[bool]:
        req = core.promote_request(namespace or self.namespace, keys, tier)

        async def call(left: float) -> pb.PromoteReply:
            reply: pb.PromoteReply = await self._stub.Promote(req, timeout=left)
            return reply

        return list((await self._call("Promote", call, timeout_s, True)).promoted)

    async def delete(self, keys: Sequence[bytes], *, namespace: str | None = None,
                     timeout_s: float | None = None) -> int:
        req = core.delete_request(namespace or self.namespace, keys)

        async def call(left: float) -> pb.DeleteReply:
            reply: pb.DeleteReply = await self._stub.Delete(req, timeout=left)
            return reply

        return int((await self._call("Delete", call, timeout_s, False)).deleted)

    async def stats(self, *, namespace: str | None = None,
                    timeout_s: float | None = None) -> CacheStats:
        req = core.stats_request(namespace or self.namespace)

        async def call(left: float) -> pb.StatsReply:
            reply: pb.StatsReply = await self._stub.Stats(req, timeout=left)
            return reply

        return core.cache_stats(await self._call("Stats", call, timeout_s, True))

    @property
    def uses_shared_memory(self) -> bool:
        return self._shm.session is not None

    @property
    def uses_data_channel(self) -> bool:
        """As :attr:`KVTierClient.uses_data_channel`."""
        return self._data.usable

    async def close(self) -> None:
        self._data.close()
        async with self._shm_lock:
            session = self._shm.session
            self._shm.drop()
            if session is not None:  # the session ends on the daemon before the channel
                await session.call.closed()
        await self._channel.close(None)

    async def __aenter__(self) -> AsyncKVTierClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncLease:
    """The asyncio client's :class:`kvtier_client.shm.Lease`: a task renews the session's lease
    every third of it; :meth:`cancel` stops it and ends the session (``CloseShm``), which
    :meth:`closed` awaits."""

    def __init__(self, stub: Any, namespace: str, session_id: str, lease_s: float) -> None:
        self._stub = stub
        self._request = pb.ShmLeaseRequest(namespace=namespace, session=session_id)
        self._period = max(0.05, lease_s / 3)
        self.lost = False
        self._task: asyncio.Task[None] | None = asyncio.ensure_future(self._renew())
        self._closing: asyncio.Future[Any] | None = None

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self._period)
            try:
                await self._stub.RenewShm(self._request, timeout=self._period)
            except grpc.RpcError as e:
                if shm_mod.session_lost(e):
                    self.lost = True
                    return
            except (ValueError, RuntimeError):  # the channel was closed
                return

    def cancel(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        self._task = None
        if not self.lost:
            self._closing = asyncio.ensure_future(self._close())

    async def _close(self) -> None:
        try:
            await self._stub.CloseShm(self._request, timeout=1.0)
        except (grpc.RpcError, ValueError, RuntimeError):  # the lease runs out on the daemon
            pass

    async def closed(self) -> None:
        if self._closing is not None:
            await self._closing
