"""The data channel's frames: the one definition both sides read.

The data channel carries page bytes beside gRPC (the control plane) on one TCP connection per
ticket. The client (:mod:`kvtier_client.data`) and the daemon (``kvtier.transport.data``)
import this module; it depends on the standard library only.

Every message is one frame: a fixed 24-byte header, ``meta_len`` bytes of metadata, then
``payload_len`` bytes of payload::

    0       4      5       6          8            12           16                  24
    | magic | kind | flags | reserved | meta_len   | budget_ms  | payload_len       |
    | KVD1  | u8   | 0     | 0 (u16)  | u32        | u32        | u64               |
    then: meta (meta_len bytes), payload (payload_len bytes); all integers little-endian.

Kinds and what their meta and payload hold:

- ``HELLO`` (client, first frame of a connection): meta = the 32-byte ticket from the
  ``OpenData`` call; no payload. Answered ``OK`` (empty) or ``ERROR`` and the connection closed.
  The ticket binds the connection to its namespace (and, when not writable, to gets only).
- ``PUT``: meta = a serialized ``kvtier.v1.PutRequest`` holding the page headers (no ``data``,
  no shared-memory fields; ``namespace`` empty or the connection's own); payload = the pages'
  bytes in header order (page 0 k, page 0 v, page 1 k, ...), exactly the sizes the headers
  announce. Answered ``OK`` with meta = a ``PutReply``.
- ``GET``: meta = a serialized ``GetRequest`` (keys; other fields ignored); no payload. Answered
  ``OK`` with meta = a ``GetReply`` whose page results come first and payload = the found pages'
  bytes in result order (k then v each).
- ``ERROR`` (daemon): meta = the gRPC status code name in ASCII, a newline, the message in UTF-8;
  no payload. The status codes are the gRPC calls' (one error table).

``budget_ms`` of a request is the caller's time left in milliseconds (0: none); the daemon
stops reading or answering a frame past it. A request fails as a whole: the daemon stores a
put's pages only once every byte of its payload arrived and checked, and a reader reads a get's
payload whole or reports the connection broken. After an ``ERROR`` answer the connection stays
usable, unless the daemon closes it (a frame it cannot skip: bad magic, an oversized frame).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass

MAGIC = b"KVD1"
HEADER = struct.Struct("<4sBBHIIQ")
HEADER_BYTES = HEADER.size  # 24
TICKET_BYTES = 32
MAX_META_BYTES = 64 << 20  # headers of a full batch of the largest keys
MAX_BUDGET_MS = 0xFFFFFFFF

HELLO = 1
PUT = 2
GET = 3
OK = 4
ERROR = 5
KINDS = frozenset((HELLO, PUT, GET, OK, ERROR))

_IOV_MAX = 512  # buffers per sendmsg call (the OS limit is 1024 on Linux)


class FrameError(Exception):
    """A frame that breaks this protocol (bad magic, unknown kind, oversized meta)."""


class PeerClosed(ConnectionError):
    """The peer closed the connection; ``got`` bytes of the ``want`` expected had arrived."""

    def __init__(self, got: int, want: int) -> None:
        super().__init__(f"connection closed after {got} of {want} bytes")
        self.got = got
        self.want = want


@dataclass(frozen=True, slots=True)
class FrameHeader:
    kind: int
    meta_len: int
    budget_ms: int
    payload_len: int


def pack_header(kind: int, meta_len: int, payload_len: int = 0, budget_ms: int = 0) -> bytes:
    return HEADER.pack(MAGIC, kind, 0, 0, meta_len, min(max(budget_ms, 0), MAX_BUDGET_MS),
                       payload_len)


def unpack_header(data: bytes | bytearray | memoryview) -> FrameHeader:
    """The header in ``data`` (``HEADER_BYTES``); FrameError if it is not one."""
    magic, kind, _flags, _reserved, meta_len, budget_ms, payload_len = HEADER.unpack(data)
    if magic != MAGIC:
        raise FrameError(f"not a kvtier data frame (magic {bytes(magic)!r})")
    if kind not in KINDS:
        raise FrameError(f"unknown frame kind {kind}")
    if meta_len > MAX_META_BYTES:
        raise FrameError(f"frame metadata of {meta_len} bytes, above {MAX_META_BYTES}")
    return FrameHeader(kind, meta_len, budget_ms, payload_len)


def budget_ms(left_s: float | None) -> int:
    """``left_s`` seconds as a frame's ``budget_ms`` (at least 1 ms; 0 = no deadline)."""
    if left_s is None:
        return 0
    return min(max(1, int(left_s * 1000)), MAX_BUDGET_MS)


def encode_error(code: str, message: str) -> bytes:
    return code.encode("ascii") + b"\n" + message.encode("utf-8", "replace")


def decode_error(meta: bytes) -> tuple[str, str]:
    """``(code, message)`` of an ERROR frame's meta."""
    code, _, message = meta.partition(b"\n")
    return code.decode("ascii", "replace") or "UNKNOWN", message.decode("utf-8", "replace")


def send_frame(sock: socket.socket, kind: int, meta: bytes = b"",
               parts: Sequence[memoryview] = (), budget: int = 0) -> None:
    """Send one frame: header, ``meta`` and ``parts`` (the payload) with vectored writes,
    without joining the parts (no copy of page bytes). Sockets without ``sendmsg`` (TLS)
    get one ``sendall`` per part."""
    payload_len = sum(p.nbytes for p in parts)
    bufs: list[memoryview] = [memoryview(pack_header(kind, len(meta), payload_len, budget))]
    if meta:
        bufs.append(memoryview(meta))
    bufs += [p if p.format == "B" and p.ndim == 1 else p.cast("B") for p in parts if p.nbytes]
    sendmsg = getattr(sock, "sendmsg", None)
    if sendmsg is None or not _vectored(sock):
        for b in bufs:
            sock.sendall(b)
        return
    i = 0
    while i < len(bufs):
        sent = sendmsg(bufs[i:i + _IOV_MAX])
        while i < len(bufs) and sent >= bufs[i].nbytes:  # drop the buffers fully sent
            sent -= bufs[i].nbytes
            i += 1
        if sent:
            bufs[i] = bufs[i][sent:]


def _vectored(sock: socket.socket) -> bool:
    return type(sock) is socket.socket  # an ssl.SSLSocket refuses sendmsg


def recv_into(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock``; PeerClosed if the peer closes first."""
    got, want = 0, view.nbytes
    while got < want:
        n = sock.recv_into(view[got:], want - got)
        if n == 0:
            raise PeerClosed(got, want)
        got += n


def recv_header(sock: socket.socket) -> FrameHeader:
    buf = bytearray(HEADER_BYTES)
    recv_into(sock, memoryview(buf))
    return unpack_header(buf)


def recv_bytes(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    if n:
        recv_into(sock, memoryview(buf))
    return bytes(buf)


def skip(sock: socket.socket, n: int, scratch: memoryview) -> None:
    """Read and drop ``n`` bytes (a payload refused before it was read, to keep the framing)."""
    while n > 0:
        take = min(n, scratch.nbytes)
        recv_into(sock, scratch[:take])
        n -= take


__all__ = [
    "ERROR", "GET", "HEADER_BYTES", "HELLO", "KINDS", "MAGIC", "MAX_META_BYTES", "OK", "PUT",
    "TICKET_BYTES", "FrameError", "FrameHeader", "PeerClosed", "budget_ms", "decode_error",
    "encode_error", "pack_header", "recv_bytes", "recv_header", "recv_into", "send_frame",
    "skip", "unpack_header",
]
