"""One data-channel connection: its hello, then its put and get frames, one at a time.

Each request frame is checked by the same code as the gRPC calls (headers, keys, batch
limits) before its payload is read; a refused frame's payload is skipped so that the
connection stays usable, except where the frame cannot be skipped (bad magic, a frame above
``max_frame_bytes``): then the answer is sent and the connection closed. A put's pages are read
straight into buffers of the daemon's pool (``recv_into``, no other copy), checked for NaN/Inf
and stored only once the whole payload arrived: a peer that stops mid-page, closes, or runs
past its deadline stores nothing. A get's pages are sent from the tier's memory with vectored
writes. Errors are answered with the status of the one table (``kvtier.errors.status_for``).
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Sequence
from typing import TypeVar, cast

from google.protobuf.message import DecodeError, Message

from kvtier.errors import (
    InvalidArgument,
    DeadlineExceeded,
    PermissionDenied,
    Unauthenticated,
    is_internal,
    status_for,
)
from kvtier.finite import check_finite
from kvtier.pages import PageHeader, page_of_buffer
from kvtier.store.results import PutOutcome
from kvtier.transport.cache.convert import byte_view, check_header
from kvtier.transport.context import DaemonContext
from kvtier.transport.data.tickets import Grant, TicketBook
from kvtier.transport.stats import RpcSample
from kvtier.types import Page, PageId
import kvtier_client.data_frame as f
from kvtier_proto.v1 import cache_pb2 as pb

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Message)

HELLO_TIMEOUT_S = 10.0
_SCRATCH = 1 << 20
_PUT_OUTCOME = {PutOutcome.STORED: pb.PUT_OUTCOME_STORED, PutOutcome.EXISTS: pb.PUT_OUTCOME_EXISTS}


class _Close(Exception):
    """End the connection after answering (the frame cannot be skipped)."""


class DataConnection:
    """Serves one accepted socket until the peer closes, idles out or breaks the protocol."""

    def __init__(self, sock: socket.socket, ctx: DaemonContext, tickets: TicketBook) -> None:
        self._sock = sock
        self._ctx = ctx
        self._store = ctx.store
        self._settings = ctx.settings
        self._tickets = tickets
        self._grant: Grant | None = None
        self._scratch: memoryview | None = None

    def serve(self) -> None:
        sock = self._sock
        try:
            sock.settimeout(HELLO_TIMEOUT_S)
            if not self._hello():
                return
            idle = self._settings.data.idle_timeout_s
            while True:
                sock.settimeout(idle)
                try:
                    hdr = f.recv_header(sock)
                except (f.PeerClosed, TimeoutError):
                    return  # closed or idle between frames: a normal end
                if not self._frame(hdr):
                    return
        except f.FrameError as e:
            self._answer_error(InvalidArgument(str(e), field="frame"))
        except (OSError, f.PeerClosed):
            pass  # the peer went away mid-frame: nothing of that frame was stored
        finally:
            try:
                sock.close()
            except OSError:
                pass

    # -- frames ----------------------------------------------------------------------------

    def _hello(self) -> bool:
        try:
            hdr = f.recv_header(self._sock)
        except (f.PeerClosed, TimeoutError):
            return False
        if hdr.kind != f.HELLO or hdr.payload_len or hdr.meta_len != f.TICKET_BYTES:
            self._answer_error(InvalidArgument(
                "the first frame of a data connection must be HELLO with a ticket",
                field="frame"))
            return False
        grant = self._tickets.redeem(f.recv_bytes(self._sock, hdr.meta_len))
        if grant is None:
            self._answer_error(Unauthenticated(
                "unknown, used or expired data ticket: call OpenData again", field="ticket"))
            return False
        self._grant = grant
        f.send_frame(self._sock, f.OK)
        return True

    def _frame(self, hdr: f.FrameHeader) -> bool:
        """Serve one request frame; False: close the connection."""
        t0 = time.perf_counter()
        deadline = None if not hdr.budget_ms else time.monotonic() + hdr.budget_ms / 1000
        method = {f.PUT: "DataPut", f.GET: "DataGet"}.get(hdr.kind, "Data")
        bytes_out = 0
        try:
            if hdr.payload_len > self._settings.data.max_frame_bytes:
                raise _Close(InvalidArgument(
                    f"frame payload of {hdr.payload_len} bytes, above the data channel's "
                    f"max_frame_bytes ({self._settings.data.max_frame_bytes})", field="frame"))
            self._read_timeout(deadline)
            meta = f.recv_bytes(self._sock, hdr.meta_len)
            if hdr.kind == f.PUT:
                self._put(hdr, meta, deadline)
            elif hdr.kind == f.GET:
                bytes_out = self._get(hdr, meta, deadline)
            else:
                self._skip(hdr.payload_len, deadline)
                raise InvalidArgument(f"frame kind {hdr.kind} is not a request", field="frame")
        except _Close as e:
            err = cast(BaseException, e.args[0])
            self._record(method, err, t0, hdr, 0)
            self._answer_error(err)
            return False
        except TimeoutError:
            err = DeadlineExceeded("deadline exceeded while reading the frame", field="frame")
            self._record(method, err, t0, hdr, 0)
            self._answer_error(err)
            return False  # the rest of the frame may still come: the framing is lost
        except (OSError, f.PeerClosed):
            self._record(method, ConnectionError(), t0, hdr, 0, code="CANCELLED")
            return False
        except BaseException as e:  # noqa: BLE001 - answered by the one table
            self._record(method, e, t0, hdr, 0)
            self._answer_error(e, method)
            return True
        self._record(method, None, t0, hdr, bytes_out)
        return True

    def _put(self, hdr: f.FrameHeader, meta: bytes, deadline: float | None) -> None:
        try:
            req = _parse(pb.PutRequest, meta)
            grant = self._check_namespace(req.namespace, write=True)
            if req.shm_session or req.data:
                raise InvalidArgument("a data-channel put carries its bytes in the payload",
                                      field="data")
            headers = self._headers(req.pages)
            need = sum(2 * h.nbytes for h in headers)
            if need != hdr.payload_len:
                raise InvalidArgument(
                    f"payload of {hdr.payload_len} bytes, but the page headers announce "
                    f"{need}", field="frame")
        except BaseException:
            self._skip(hdr.payload_len, deadline)
            raise
        pids = [PageId(grant.namespace, h.key) for h in headers]
        if len(set(pids)) != len(pids):
            self._skip(hdr.payload_len, deadline)
            raise InvalidArgument("the same key appears twice in one put", field="keys")
        buffers = self._ctx.buffers
        read = []
        for h in headers:  # each page straight into its own buffer, nothing staged
            buf = buffers.take(2 * h.nbytes)
            arr = buf.numpy()
            f.recv_into(self._sock, arr.data)
            read.append((h, buf, arr))
        self._check_deadline(deadline)
        pages: list[Page] = []
        for h, buf, arr in read:
            check_finite(arr[:h.nbytes].data, h.dtype, "k")
            check_finite(arr[h.nbytes:].data, h.dtype, "v")
            pages.append(page_of_buffer(h, buf))
        chains = [h.chain_position for h in headers]
        if any(c is None for c in chains):  # the store's default: positions in the batch
            chains = list(range(len(pids)))
        outcomes = self._store.put_checked(pids, pages, cast(list[int], chains), owned=True)
        reply = pb.PutReply(outcomes=[_PUT_OUTCOME[o] for o in outcomes])
        f.send_frame(self._sock, f.OK, reply.SerializeToString())

    def _get(self, hdr: f.FrameHeader, meta: bytes, deadline: float | None) -> int:
        if hdr.payload_len:
            self._skip(hdr.payload_len, deadline)
            raise InvalidArgument("a get frame carries no payload", field="frame")
        req = _parse(pb.GetRequest, meta)
        grant = self._check_namespace(req.namespace)
        pids = self._store.check_keys(grant.namespace, req.keys)
        raws = self._store.get_raw_checked(pids)
        results: list[pb.PageResult] = []
        parts: list[memoryview] = []
        for i, raw in enumerate(raws):
            if raw is None:
                results.append(pb.PageResult(index=i, found=False))
                continue
            k, v = byte_view(raw.k), byte_view(raw.v)
            results.append(pb.PageResult(
                index=i, found=True, dtype=raw.dtype, shape=list(raw.shape),
                start_position=raw.start_position, tier=raw.tier,
                precision=int(raw.precision), k_len=k.nbytes, v_len=v.nbytes))
            parts += [k, v]
        self._check_deadline(deadline)
        self._sock.settimeout(None if deadline is None else max(0.001, deadline - time.monotonic()))
        f.send_frame(self._sock, f.OK, pb.GetReply(pages=results).SerializeToString(), parts)
        return sum(p.nbytes for p in parts)

    # -- helpers ---------------------------------------------------------------------------

    def _headers(self, raw: Sequence[pb.PageHeader]) -> list[PageHeader]:
        if not raw:
            raise InvalidArgument("the page list is empty", field="pages")
        if len(raw) > self._settings.max_batch:
            raise InvalidArgument(
                f"{len(raw)} pages in one call, more than the maximum batch of "
                f"{self._settings.max_batch}", field="pages")
        headers = []
        for h in raw:
            if h.HasField("shm_offset"):
                raise InvalidArgument("shm_offset set on a data-channel put",
                                      field="shm_offset")
            headers.append(check_header(h, self._settings))
        return headers

    def _check_namespace(self, namespace: str, write: bool = False) -> Grant:
        """The connection's grant for a frame naming ``namespace`` (empty: its own): another
        namespace is PERMISSION_DENIED, and so is a write on a read-only ticket; with tokens,
        the ticket's token is checked again (revoked: UNAUTHENTICATED, and the connection
        ends)."""
        grant = self._grant
        assert grant is not None
        tokens = self._ctx.tokens
        if tokens is not None:
            now = tokens.grant(grant.token) if grant.token is not None else None
            if now is None:
                raise _Close(Unauthenticated(
                    "the data connection's token is no longer valid (revoked)",
                    field="authorization"))
            if not now.allows(grant.namespace, write):
                raise PermissionDenied(
                    f"the token no longer allows {'writing' if write else 'reading'} "
                    f"namespace {grant.namespace!r}", field="authorization")
        if write and not grant.writable:
            raise PermissionDenied("this data connection's ticket is read-only",
                                   field="ticket")
        if namespace and namespace != grant.namespace:
            raise PermissionDenied(
                f"this data connection belongs to namespace {grant.namespace!r}, not "
                f"{namespace!r}", field="namespace")
        return grant

    def _read_timeout(self, deadline: float | None) -> None:
        idle = self._settings.data.idle_timeout_s
        left = idle if deadline is None else min(idle, deadline - time.monotonic())
        if left <= 0:
            raise TimeoutError
        self._sock.settimeout(left)

    @staticmethod
    def _check_deadline(deadline: float | None) -> None:
        if deadline is not None and time.monotonic() > deadline:
            raise DeadlineExceeded("deadline exceeded before the frame was served",
                                 field="frame")

    def _skip(self, n: int, deadline: float | None) -> None:
        if not n:
            return
        if self._scratch is None:
            self._scratch = memoryview(bytearray(_SCRATCH))
        self._read_timeout(deadline)
        f.skip(self._sock, n, self._scratch)

    def _answer_error(self, exc: BaseException, method: str = "Data") -> None:
        code, _http, message = status_for(exc)
        if is_internal(exc):
            log.error("data channel %s failed unexpectedly; answering INTERNAL", method,
                      exc_info=exc)
            message = f"internal error in {method} ({type(exc).__name__}); see daemon log"
        try:
            self._sock.settimeout(HELLO_TIMEOUT_S)
            f.send_frame(self._sock, f.ERROR, f.encode_error(code, message))
        except OSError:
            pass

    def _record(self, method: str, exc: BaseException | None, t0: float, hdr: f.FrameHeader,
                bytes_out: int, code: str | None = None) -> None:
        if code is None:
            code = "OK" if exc is None else status_for(exc)[0]
        self._ctx.rpc_stats.record(RpcSample(method, code, time.perf_counter() - t0,
                                             hdr.meta_len + hdr.payload_len, bytes_out))


def _parse(cls: type[M], meta: bytes) -> M:
    msg = cls()
    try:
        msg.ParseFromString(meta)
    except DecodeError:
        raise InvalidArgument(f"frame metadata is not a {cls.__name__}", field="frame") from None
    return msg
