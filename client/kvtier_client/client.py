"""The synchronous client an inference worker uses: :class:`KVTierClient`.

Every call takes a batch of keys, a namespace (the client's default unless given) and a
deadline (``timeout_s``, the client's default unless given). Only idempotent calls (put - per
key -, get, lookup, promote, stats) are retried, and only on UNAVAILABLE, within the deadline.
Errors are :mod:`kvtier_client.errors` classes carrying the status code and the daemon's message.

Page bytes travel through a shared-memory segment when the daemon is on this host
(``shared_memory="auto"``, the default, tries it for loopback addresses), else over the data
channel (:mod:`kvtier_client.data`: TCP frames beside gRPC, ``data_channel=True``, the
default), else inline over gRPC (chunked streams), each falling back to the next where the
daemon does not offer it.

A thin driver: what each call sends, through which path, when it is retried and what its
replies mean is planned by :mod:`kvtier_client.core`; this class makes the blocking calls.
"""

from __future__ import annotations

import queue
import ssl
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import grpc

from kvtier_client import core
from kvtier_client import shm as shm_mod
from kvtier_client.credentials import with_token
from kvtier_client.core import DEFAULT_CHUNK_BYTES, CacheStats, LookupResult, TierStats
from kvtier_client.data import DataChannel, DataConn, put_parts
from kvtier_client.errors import KVTierClientError
from kvtier_client.shm import Segment
from kvtier_client.staging import new_page, release_page
from kvtier_client.tensors import FetchedPage, Page
from kvtier_client.tls import channel_credentials, data_ssl_context
from kvtier_proto.v1 import cache_pb2 as pb
from kvtier_proto.v1 import cache_pb2_grpc as pb_grpc

T = TypeVar("T")


class KVTierClient:
    """Blocking client. Thread-safe; shared-memory transfers are serialized per client.

    ``overlap_copy`` (on by default): a put with at least 256 KiB to copy into the segment
    starts its call first and copies while it is in flight (``shm_fill``); the daemon reads
    each part as soon as it is written, so the client's copy hides behind the call's start.
    x86-64 only; ignored elsewhere. The copier thread needs the GIL between pieces: in a
    process whose other threads hold it for long stretches (long C calls) an overlapped put
    waits for each piece, so turn it off there.

    ``lend_bytes``: a lend area of that size in the segment (default: a quarter of the
    segment, at most 64 MiB; 0: none). A put whose pages fit there lends them: the daemon keeps
    the pages where they lie, with no copy of its own, and hands each range back (see
    ``kvtier.transport.shm.lend``) when the page leaves the hot tier or is deleted. Only this
    library writes the area. While it is full a put copies as usual and asks the daemon to
    copy the lent pages out in the background, after which puts lend again. The area and its
    return ring (512 KiB) come out of the request area, which bounds how many bytes one get
    can bring back through the segment. The asyncio client takes it too.

    ``token``: the tenant token a daemon with tenant auth wants on every call (sent as
    ``authorization: Bearer <token>``; see ``kvtier token create``). The asyncio client and
    :class:`~kvtier_client.device.DeviceSession` take it too.

    ``tls_ca_file`` (the CA of the daemon's certificate; for a self-signed daemon, its
    certificate), ``tls_cert_file`` and ``tls_key_file`` (the client's pair, where the daemon
    requires client certificates): TLS, as :mod:`kvtier_client.tls` says. The asyncio client
    takes them too.
    """

    def __init__(self, target: str, namespace: str = "default", *, timeout_s: float = 30.0,
                 shared_memory: bool | str = "auto", shm_bytes: int = 256 << 20,
                 staging_bytes: int = 0, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 overlap_copy: bool = True, lend_bytes: int | None = None,
                 channel: grpc.Channel | None = None, token: str | None = None,
                 data_channel: bool = True, data_ssl: ssl.SSLContext | None = None,
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
        self._channel = channel or (
            grpc.insecure_channel(target, options=core.CHANNEL_OPTIONS) if creds is None
            else grpc.secure_channel(target, creds, options=core.CHANNEL_OPTIONS))
        self._stub = with_token(pb_grpc.CacheServiceStub(self._channel), token)
        if data_ssl is None:  # the data channel speaks TLS with the same files
            data_ssl = data_ssl_context(tls_ca_file, tls_cert_file, tls_key_file)
        self._shm_lock = threading.Lock()
        self._filler = Filler()
        self._data = DataChannel(data_channel, target, data_ssl)
        weakref.finalize(self, self._filler.close)  # its thread ends with the client

    # -- plumbing --------------------------------------------------------------------------

    def _call(self, method: str, fn: Callable[[float], T], timeout_s: float | None,
              idempotent: bool) -> T:
        """``fn(seconds left)`` under the retry rule (:class:`kvtier_client.core.Attempts`)."""
        attempts = core.Attempts(method, self.timeout_s if timeout_s is None else timeout_s,
                                 idempotent)
        while True:
            left = attempts.start()
            try:
                return fn(left)
            except (grpc.RpcError, KVTierClientError) as e:
                time.sleep(attempts.failed(e))

    def _session(self, namespace: str) -> shm_mod.Session | None:
        """The attached segment for ``namespace`` (caller holds ``_shm_lock``), or None."""
        session, segment = self._shm.current(namespace)
        if segment is None:
            return session
        # A lease: no call stays open; the lease is renewed in the background.
        try:
            reply = self._stub.OpenShm(core.attach_request(namespace, segment),
                                       timeout=self.timeout_s)
        except grpc.RpcError as e:
            self._shm.failed(segment, None, e.details())
            return None
        lease = shm_mod.Lease(self._stub, namespace, reply.session, reply.lease_s)
        return self._shm.attached(segment, lease, reply.session, namespace)

    # -- data path -------------------------------------------------------------------------

    def put(self, keys: Sequence[bytes], pages: Sequence[Page | tuple[Any, ...]], *,
            namespace: str | None = None, timeout_s: float | None = None,
            session: str = "") -> list[str]:
        """Store pages; per key ``"stored"`` or ``"exists"`` (puts are idempotent per key).
        ``session``: the conversation/session they belong to (a hint for the policy)."""
        ns = namespace or self.namespace
        wire = core.wire_pages(keys, pages)
        hint_session = session

        def send(left: float) -> pb.PutReply:
            with self._shm_lock:
                session = self._session(ns)
                if session is not None:
                    plan: core.PutPlan | None = None
                    try:
                        with session.put_guard():
                            plan = core.plan_put(ns, wire, session, self.chunk_bytes,
                                                 self.overlap_copy)
                            return self._send(core.with_session(plan, hint_session), left)
                    except BaseException as e:
                        if not core.put_failed(self._shm, plan, e):
                            raise
            if self._data.usable and not hint_session:  # data frames carry no session hint
                reply = self._data_put(ns, wire, left)
                if reply is not None:
                    return reply
            return self._send(core.with_session(
                core.plan_put(ns, wire, None, self.chunk_bytes, False), hint_session), left)

        return core.put_outcomes(self._call("Put", send, timeout_s, idempotent=True))

    def _data_conn(self, namespace: str, left: float) -> DataConn | None:
        """A data connection of ``namespace`` (idle, or opened with a fresh ticket), or None
        where the daemon offers no data channel (the call goes down gRPC)."""
        conn = self._data.take(namespace)
        if conn is not None:
            return conn
        try:
            reply = self._stub.OpenData(self._data.open_request(namespace), timeout=left)
        except grpc.RpcError as e:
            if self._data.open_failed(e.code().name):
                return None
            raise
        return self._data.connect(namespace, reply, left)

    def _data_put(self, namespace: str, wire: Sequence[core.WirePage],
                  left: float) -> pb.PutReply | None:
        """The put over the data channel, or None where it cannot go there."""
        conn = self._data_conn(namespace, left)
        if conn is None:
            return None
        headers, parts, _ = put_parts(wire)
        return self._data.put_on(conn, headers, parts, left)

    def _send(self, plan: core.PutPlan, left: float) -> pb.PutReply:
        reply: pb.PutReply
        if plan.overlap is not None:
            assert plan.segment is not None and plan.request is not None
            plan.segment.start_fill(plan.fill)
            self._filler.start(plan.segment, plan.overlap, plan.fill)
            try:
                reply = self._stub.Put(plan.request, timeout=left)
            except BaseException:
                self._filler.wait(quiet=True)  # the call's error is the one to report
                raise
            self._filler.wait()  # the segment is not touched again before the fill ended
        elif plan.request is not None:
            reply = self._stub.Put(plan.request, timeout=left)
        else:
            reply = self._stub.PutStream(plan.stream(), timeout=left)
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
                    req = core.get_request(ns, keys, self.chunk_bytes, session)
                    try:
                        return self._collect(req, left, as_torch, session.segment.view)
                    except grpc.RpcError as e:
                        if not core.call_failed(self._shm, e):
                            raise
            if self._data.usable:
                conn = self._data_conn(ns, left)
                if conn is not None:
                    return self._data.get_on(conn, keys, left, as_torch)
            req = core.get_request(ns, keys, self.chunk_bytes)
            return self._collect(req, left, as_torch, None)

        return self._call("Get", fetch, timeout_s, idempotent=True)

    def _collect(self, req: pb.GetRequest, left: float, as_torch: bool | str,
                 segment: memoryview | None) -> list[FetchedPage | None]:
        pages = core.GetCollector(req, left, as_torch, segment)
        again = pages.first(self._stub.Get(req, timeout=left))
        if again is not None:
            for reply in self._stub.GetStream(again, timeout=pages.time_left()):
                pages.more(reply)
        return pages.result()

    def lookup(self, keys: Sequence[bytes], *, namespace: str | None = None,
               timeout_s: float | None = None, session: str = "",
               prefetch: bool = False) -> LookupResult:
        """How long a prefix of the key chain ``keys`` is present, and where. ``session``
        names the request's conversation (a hint); ``prefetch`` has the daemon start moving
        the present prefix up from lower tiers now, ahead of the get."""
        req = core.lookup_request(namespace or self.namespace, keys, session, prefetch)
        return core.lookup_result(self._call(
            "Lookup", lambda left: self._stub.Lookup(req, timeout=left), timeout_s, True))

    def hint(self, queued: Sequence[Sequence[bytes]] = (), *,
             ended_sessions: Sequence[str] = (), namespace: str | None = None,
             timeout_s: float | None = None) -> int:
        """Tell the daemon what this worker knows ahead: ``queued``, the key chains of the
        requests waiting to be scheduled (next first; replaces the queue hinted before), and
        sessions that ended. The queued chains' present prefixes are promoted ahead of use;
        returns how many pages that scheduled. Advisory: safe to repeat."""
        req = core.hint_request(namespace or self.namespace, queued, ended_sessions)
        reply = self._call("Hint", lambda left: self._stub.Hint(req, timeout=left), timeout_s,
                           True)
        return int(reply.prefetching)

    def promote(self, keys: Sequence[bytes], tier: str, *, namespace: str | None = None,
                timeout_s: float | None = None) -> list[bool]:
        req = core.promote_request(namespace or self.namespace, keys, tier)
        reply = self._call("Promote", lambda left: self._stub.Promote(req, timeout=left),
                           timeout_s, True)
        return list(reply.promoted)

    def delete(self, keys: Sequence[bytes], *, namespace: str | None = None,
               timeout_s: float | None = None) -> int:
        """Remove pages; returns how many were present. Not retried (the count would lie)."""
        req = core.delete_request(namespace or self.namespace, keys)
        reply = self._call("Delete", lambda left: self._stub.Delete(req, timeout=left),
                           timeout_s, False)
        return int(reply.deleted)

    def stats(self, *, namespace: str | None = None,
              timeout_s: float | None = None) -> CacheStats:
        """Daemon-wide tier statistics."""
        req = core.stats_request(namespace or self.namespace)
        return core.cache_stats(self._call(
            "Stats", lambda left: self._stub.Stats(req, timeout=left), timeout_s, True))

    @property
    def uses_shared_memory(self) -> bool:
        return self._shm.session is not None

    @property
    def uses_data_channel(self) -> bool:
        """Whether calls that do not go through shared memory take the data channel (until a
        call finds the daemon without one)."""
        return self._data.usable

    def close(self) -> None:
        self._data.close()
        with self._shm_lock:
            self._shm.drop()
            self._filler.close()
        self._channel.close()

    def __enter__(self) -> KVTierClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Filler:
    """A client's copier thread: fills the segment for an overlapped put while the calling
    thread makes the (blocking) call, which is cheaper than an asynchronous call here."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Segment, core.Placement, int] | None] = \
            queue.SimpleQueue()
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self, segment: Segment, plan: core.Placement, fill: int) -> None:
        """Have the copier fill ``plan``; where no thread can be started (a thread limit),
        fill it here and now, before the caller's call, as a put that does not overlap."""
        self._done.clear()
        if self._thread is None:
            thread = threading.Thread(target=self._run, name="kvtier-shm-fill", daemon=True)
            try:
                thread.start()
            except RuntimeError:
                self._done.set()
                core.fill_segment(segment, plan, fill)
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
                core.fill_segment(*job)
            except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
                self._error = e
            finally:
                del job
                self._done.set()

    def close(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread = None


__all__ = ["CacheStats", "KVTierClient", "KVTierClientError", "LookupResult", "TierStats"]
