"""The client side of the data channel: page bytes over TCP frames beside gRPC.

A worker on another host moves page bytes faster over one plain TCP connection than through
gRPC's chunked streams (the frames are ``kvtier_client.data_frame``): a put sends its headers
and page buffers with vectored writes, no copy; a get reads each page straight into the array
it returns (``recv_into``). gRPC stays the control plane: ``OpenData`` (authenticated and
namespaced like any call) returns a one-time ticket and the data port, and the connection's
first frame presents the ticket, which binds it to that namespace.

:class:`DataChannel` keeps a client's idle connections per namespace and knows whether the
daemon offers the channel: a daemon without it (``OpenData`` unimplemented, or port 0), a TLS
data port without a client TLS context, or a port that cannot be reached (for
``RETRY_AFTER_S``) sends the client's calls down the gRPC path instead, silently. A connection
that breaks mid-call is dropped and the call fails UNAVAILABLE (retried by the client's rule);
one past its deadline is dropped and the call fails DEADLINE_EXCEEDED; an ``ERROR`` frame
becomes the typed error of its status code and the connection stays.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

from kvtier_client import data_frame as f
from kvtier_client.errors import (
    DeadlineExceededError,
    InternalError,
    KVTierClientError,
    UnavailableError,
    from_code,
)
from kvtier_client.tensors import FetchedPage, from_wire
from kvtier_proto.v1 import cache_pb2 as pb

if TYPE_CHECKING:
    from kvtier_client.core import WirePage

RETRY_AFTER_S = 30.0  # after the data port could not be reached, gRPC only for this long
IDLE_PER_NAMESPACE = 8  # idle connections kept per namespace
CONNECT_TIMEOUT_S = 5.0


def target_host(target: str) -> str | None:
    """The host part of a gRPC target (``host:port``, ``[v6]:port``, ``dns:///host:port``),
    or None where there is no TCP host (``unix:`` targets)."""
    t = target
    if t.startswith("unix:"):
        return None
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if t.startswith(scheme):
            t = t[len(scheme):]
            break
    if t.startswith("["):
        end = t.find("]")
        return t[1:end] if end > 0 else None
    host, sep, _port = t.rpartition(":")
    return host if sep else t


class DataConn:
    """One data connection, bound to ``namespace`` by its ticket; one call at a time."""

    def __init__(self, sock: socket.socket, namespace: str, writable: bool,
                 max_frame_bytes: int) -> None:
        self.sock = sock
        self.namespace = namespace
        self.writable = writable
        self.max_frame_bytes = max_frame_bytes
        self.broken = False

    def hello(self, ticket: bytes) -> None:
        f.send_frame(self.sock, f.HELLO, ticket)
        self._reply("OpenData")

    def put(self, headers: Sequence[pb.PageHeader], parts: Sequence[memoryview],
            left: float) -> pb.PutReply:
        """Send one PUT frame; the daemon's PutReply."""
        meta = pb.PutRequest(pages=headers).SerializeToString()
        deadline = time.monotonic() + left
        with self._io("Put"):
            f.send_frame(self.sock, f.PUT, meta, parts, f.budget_ms(left))
            hdr, reply_meta = self._reply("Put", deadline)
            if hdr.payload_len:
                raise self._broke(InternalError("a put reply carries a payload",
                                                method="Put"))
        reply = pb.PutReply()
        reply.ParseFromString(reply_meta)
        return reply

    def get(self, keys: Sequence[bytes], left: float,
            as_torch: bool | str) -> list[FetchedPage | None]:
        """Send one GET frame; each page read straight into the array returned."""
        meta = pb.GetRequest(keys=list(keys)).SerializeToString()
        deadline = time.monotonic() + left
        with self._io("Get"):
            f.send_frame(self.sock, f.GET, meta, (), f.budget_ms(left))
            hdr, reply_meta = self._reply("Get", deadline)
            reply = pb.GetReply()
            reply.ParseFromString(reply_meta)
            found = [r for r in reply.pages if r.found]
            if sum(r.k_len + r.v_len for r in found) != hdr.payload_len or any(
                    r.index < 0 or r.index >= len(keys) for r in found):
                raise self._broke(InternalError(
                    "a get reply's payload does not match its page results", method="Get"))
            out: list[FetchedPage | None] = [None] * len(keys)
            for r in found:
                buf = np.empty(r.k_len + r.v_len, np.uint8)
                self._timeout(deadline)
                f.recv_into(self.sock, buf.data)
                shape = tuple(int(s) for s in r.shape)
                out[r.index] = FetchedPage(
                    k=from_wire(buf[:r.k_len], r.dtype, shape, as_torch),
                    v=from_wire(buf[r.k_len:], r.dtype, shape, as_torch),
                    dtype=r.dtype, shape=shape, start_position=r.start_position,
                    tier=r.tier, precision=r.precision)
        return out

    def close(self) -> None:
        self.broken = True
        try:
            self.sock.close()
        except OSError:
            pass

    # -- plumbing --------------------------------------------------------------------------

    def _reply(self, method: str, deadline: float | None = None) -> tuple[f.FrameHeader, bytes]:
        """The answer frame's header and meta; an ERROR frame raises its typed error."""
        self._timeout(deadline)
        hdr = f.recv_header(self.sock)
        if hdr.kind not in (f.OK, f.ERROR):
            raise self._broke(InternalError(f"unexpected frame kind {hdr.kind} in a reply",
                                            method=method))
        meta = f.recv_bytes(self.sock, hdr.meta_len)
        if hdr.kind == f.ERROR:
            if hdr.payload_len:
                self.broken = True
            code, message = f.decode_error(meta)
            raise from_code(code, message, method)
        return hdr, meta

    def _timeout(self, deadline: float | None) -> None:
        if deadline is None:
            self.sock.settimeout(CONNECT_TIMEOUT_S)
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        self.sock.settimeout(left)

    def _broke(self, err: KVTierClientError) -> KVTierClientError:
        self.broken = True
        return err

    @contextmanager
    def _io(self, method: str) -> Iterator[None]:
        """Socket failures of one call as typed errors; the connection is marked broken."""
        try:
            yield
        except KVTierClientError:
            raise
        except TimeoutError:  # socket.timeout; checked before OSError, its base
            self.broken = True
            raise DeadlineExceededError("deadline exceeded on the data channel",
                                        method=method) from None
        except (OSError, f.PeerClosed, f.FrameError) as e:
            self.broken = True
            raise UnavailableError(f"data connection lost: {e}", method=method) from None
        except BaseException:
            self.broken = True
            raise


class DataChannel:
    """A client's data channel to one daemon: idle connections per namespace, and whether the
    daemon offers the channel (thread-safe)."""

    def __init__(self, enabled: bool, target: str,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.host = target_host(target) if enabled else None
        self.ssl_context = ssl_context
        self._lock = threading.Lock()
        self._idle: dict[str, list[DataConn]] = {}
        self._off_until = 0.0 if self.host is not None else float("inf")

    @property
    def usable(self) -> bool:
        return time.monotonic() >= self._off_until

    def off(self, for_s: float = float("inf")) -> None:
        """Send calls down gRPC (for ``for_s`` seconds)."""
        with self._lock:
            self._off_until = time.monotonic() + for_s
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for c in conns:
                c.close()

    def take(self, namespace: str) -> DataConn | None:
        """An idle connection of ``namespace``, or None (then open one)."""
        with self._lock:
            conns = self._idle.get(namespace)
            return conns.pop() if conns else None

    @staticmethod
    def open_request(namespace: str) -> pb.OpenDataRequest:
        return pb.OpenDataRequest(namespace=namespace, writable=True)

    def open_failed(self, code: str) -> bool:
        """``OpenData`` failed with ``code``: True if the call should go down gRPC (the daemon
        does not know the call); False: raise the error as the call's."""
        if code == "UNIMPLEMENTED":
            self.off()
            return True
        return False

    def connect(self, namespace: str, reply: pb.OpenDataReply,
                left: float) -> DataConn | None:
        """Connect with the ``OpenData`` answer ``reply``; None (use gRPC) when the daemon
        offers no data channel or it cannot be reached."""
        if not reply.port or (reply.tls and self.ssl_context is None):
            self.off()
            return None
        assert self.host is not None
        try:
            sock = socket.create_connection((self.host, reply.port),
                                            timeout=min(left, CONNECT_TIMEOUT_S))
        except OSError:
            self.off(RETRY_AFTER_S)
            return None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if reply.tls:
            assert self.ssl_context is not None
            sock = self.ssl_context.wrap_socket(sock, server_hostname=self.host)
        conn = DataConn(sock, namespace, reply.writable, reply.max_frame_bytes)
        try:
            with conn._io("OpenData"):
                conn.hello(reply.ticket)
        except BaseException:
            conn.close()
            raise
        return conn

    def give(self, conn: DataConn) -> None:
        """Return ``conn`` after a call: kept idle unless broken or enough are kept."""
        if conn.broken:
            conn.close()
            return
        with self._lock:
            conns = self._idle.setdefault(conn.namespace, [])
            if len(conns) < IDLE_PER_NAMESPACE and self.usable:
                conns.append(conn)
                return
        conn.close()

    def put_on(self, conn: DataConn, headers: Sequence[pb.PageHeader],
               parts: Sequence[memoryview], left: float) -> pb.PutReply | None:
        """``conn.put``, with ``conn`` given back afterwards whatever happens (also where a
        driver runs this on a thread and stops waiting); None where the put cannot go over
        this connection (read-only ticket, a batch above the daemon's frame limit)."""
        try:
            if not conn.writable or sum(p.nbytes for p in parts) > conn.max_frame_bytes:
                return None
            return conn.put(headers, parts, left)
        finally:
            self.give(conn)

    def get_on(self, conn: DataConn, keys: Sequence[bytes], left: float,
               as_torch: bool | str) -> list[FetchedPage | None]:
        """``conn.get``, with ``conn`` given back afterwards (as :meth:`put_on`)."""
        try:
            return conn.get(keys, left, as_torch)
        finally:
            self.give(conn)

    def close(self) -> None:
        self.off()


def put_parts(pages: Sequence[WirePage]) -> tuple[list[pb.PageHeader], list[memoryview], int]:
    """The headers, payload buffers and payload size of a data-channel put of ``pages``."""
    from kvtier_client.core import header

    headers = [header(p) for p in pages]
    parts = [mv for p in pages for mv in (p.k.data, p.v.data)]
    return headers, parts, sum(p.nbytes for p in parts)


__all__ = ["DataChannel", "DataConn", "put_parts", "target_host"]
