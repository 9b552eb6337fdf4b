"""Wire <-> core conversions of the cache service: page headers, byte streams, stats.

Put streams carry the batch's page bytes as one byte stream (page 0 k, page 0 v, page 1 k, ...)
cut into chunks at arbitrary points. :class:`PutAssembler` checks each header as soon as it
arrives (so an oversized or malformed page is refused before its bytes are received) and
rebuilds pages from the chunks, copying each page's bytes once where a page lies in one chunk.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from kvtier.config import Settings
from kvtier.errors import InvalidArgument
from kvtier.finite import check_finite
from kvtier import pages
from kvtier.pages import PageHeader, page_of_buffer
from kvtier.store.buffers import BufferPool
from kvtier.types import Page
from kvtier_proto.v1 import cache_pb2 as pb


def check_header(h: pb.PageHeader, settings: Settings) -> PageHeader:
    """Validate one wire header (:func:`kvtier.pages.check_header`)."""
    return pages.check_header(
        h.key, h.dtype, h.shape, h.start_position, h.k_len, h.v_len,
        max_key_bytes=settings.max_key_bytes, max_page_bytes=settings.max_page_bytes,
        v_dtype=h.v_dtype, v_shape=h.v_shape,
        chain_position=h.chain_position if h.HasField("chain_position") else None,
        shm_offset=h.shm_offset if h.HasField("shm_offset") else None)


def build_page(h: PageHeader, k: bytes | memoryview, v: bytes | memoryview,
               buffers: BufferPool) -> Page:
    """The page of ``h`` from its bytes, copied once into a buffer of ``buffers`` that the page
    owns and checked there for NaN/Inf.

    ``h`` was checked by :func:`check_header`: sizes, dtype, shape, start position, i.e. all
    that :func:`~kvtier.pages.make_page` checks, so the page can go to
    ``TierStore.put_checked(owned=True)``, which neither checks nor copies it again.
    """
    n = h.nbytes
    buf = buffers.take(2 * n)  # k then v; not zeroed (filled right away)
    arr = buf.numpy()
    arr[:n] = np.frombuffer(k, np.uint8)
    arr[n:] = np.frombuffer(v, np.uint8)
    check_finite(arr[:n].data, h.dtype, "k")
    check_finite(arr[n:].data, h.dtype, "v")
    return page_of_buffer(h, buf)


class PutAssembler:
    """Rebuilds the pages of an inline Put byte stream, chunk by chunk."""

    def __init__(self, settings: Settings, buffers: BufferPool) -> None:
        self._settings = settings
        self._buffers = buffers
        self._pending: list[PageHeader] = []  # headers whose bytes have not fully arrived
        self._buf = bytearray()  # bytes of the first pending page received so far
        self.pages: list[tuple[PageHeader, Page]] = []

    def add_headers(self, headers: Sequence[PageHeader]) -> None:
        self._pending.extend(headers)

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            if not self._pending:
                raise InvalidArgument(
                    "put stream carries more bytes than its page headers announce", field="data"
                )
            h = self._pending[0]
            need = 2 * h.nbytes - len(self._buf)
            if not self._buf and len(view) - pos >= need:  # whole page in this chunk: no staging
                k = view[pos:pos + h.nbytes]
                v = view[pos + h.nbytes:pos + need]
                self._complete(h, k, v)
                pos += need
                continue
            take = min(need, len(view) - pos)
            self._buf += view[pos:pos + take]
            pos += take
            if len(self._buf) == 2 * h.nbytes:
                buf = memoryview(self._buf)
                self._complete(h, buf[:h.nbytes], buf[h.nbytes:])
                self._buf = bytearray()

    def _complete(self, h: PageHeader, k: memoryview, v: memoryview) -> None:
        self._pending.pop(0)
        self.pages.append((h, build_page(h, k, v, self._buffers)))

    def finish(self) -> None:
        if self._pending:
            h = self._pending[0]
            raise InvalidArgument(
                f"put stream ended after {len(self._buf)} of the {2 * h.nbytes} bytes of page "
                f"{h.key.hex()[:16]} ({len(self._pending)} pages incomplete)", field="data"
            )


def byte_view(mv: memoryview) -> memoryview:
    """A flat unsigned-byte view of a buffer (tensor memoryviews may be typed or shaped)."""
    if mv.format == "B" and mv.ndim == 1:
        return mv
    return mv.cast("B") if mv.ndim == 1 else mv.cast("B", (mv.nbytes,))


def chunks(parts: Sequence[memoryview], chunk_bytes: int) -> Iterator[bytes]:
    """Cut the concatenation of ``parts`` into ``chunk_bytes`` pieces (the last may be short)."""
    buf = bytearray()
    for part in parts:
        pos = 0
        while pos < len(part):
            if not buf and len(part) - pos >= chunk_bytes:
                yield bytes(part[pos:pos + chunk_bytes])
                pos += chunk_bytes
                continue
            take = min(chunk_bytes - len(buf), len(part) - pos)
            buf += part[pos:pos + take]
            pos += take
            if len(buf) == chunk_bytes:
                yield bytes(buf)
                buf = bytearray()
    if buf:
        yield bytes(buf)
