"""Wire <-> core conversions of the cache service: page headers, byte streams, stats.

Put streams carry the batch's page bytes as one byte stream (page 0 k, page 0 v, page 1 k, ...)
cut into chunks at arbitrary points. :class:`PutAssembler` checks each header as soon as it
arrives (so an oversized or malformed page is refused before its bytes are received) and
rebuilds pages from the chunks, copying each page's bytes once where a page lies in one chunk.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kvtier.config import Settings
from kvtier.errors import InvalidArgument, PageTooLarge
from kvtier.finite import check_finite
from kvtier.pages import check_key, torch_dtype
from kvtier.store.buffers import BufferPool
from kvtier.types import Page, PageKey
from kvtier_proto.v1 import cache_pb2 as pb

_ELEM = {"float16": 2, "bfloat16": 2, "float32": 4}


@dataclass(frozen=True, slots=True)
class Header:
    """A checked page header: everything but the bytes."""

    key: PageKey
    dtype: str
    shape: tuple[int, ...]
    start_position: int
    nbytes: int  # of k; v has the same
    chain_position: int | None
    shm_offset: int | None


def check_header(h: pb.PageHeader, settings: Settings) -> Header:
    """Validate one header; InvalidArgument naming the field otherwise."""
    key = check_key(h.key, settings.max_key_bytes)
    dtype = h.dtype
    elem = _ELEM.get(dtype)
    if elem is None:
        torch_dtype(dtype)  # raises naming the supported dtypes
        raise AssertionError(f"dtype {dtype!r} is supported but has no element size")
    shape = tuple(h.shape)  # protobuf ints
    if len(shape) != 4 or min(shape) <= 0:
        raise InvalidArgument(
            f"shape must be 4 positive sizes [layers, tokens, kv_heads, head_dim], got "
            f"{list(shape)}", field="shape"
        )
    if h.v_dtype and h.v_dtype != dtype:
        torch_dtype(h.v_dtype)
        raise InvalidArgument(
            f"k and v dtypes differ: k {dtype} vs v {h.v_dtype}", field="v.dtype"
        )
    if h.v_shape and tuple(h.v_shape) != shape:
        raise InvalidArgument(
            f"k and v shapes differ: k {list(shape)} vs v {list(h.v_shape)}", field="v.shape"
        )
    start = h.start_position
    if start < 0:
        raise InvalidArgument(f"start_position must be >= 0, got {start}", field="start_position")
    want = elem * shape[0] * shape[1] * shape[2] * shape[3]
    if 2 * want > settings.max_page_bytes:
        raise PageTooLarge(
            f"page is {2 * want} bytes (k+v), above the maximum page size of "
            f"{settings.max_page_bytes} bytes", field="page"
        )
    if h.k_len != want or h.v_len != want:
        name, got = ("k", h.k_len) if h.k_len != want else ("v", h.v_len)
        raise InvalidArgument(
            f"{name} has {got} bytes but dtype {dtype} x shape {list(shape)} needs {want}",
            field=f"{name}.data",
        )
    chain = h.chain_position if h.HasField("chain_position") else None
    if chain is not None and chain < 0:
        raise InvalidArgument(f"chain_position must be >= 0, got {chain}", field="chain_position")
    shm = h.shm_offset if h.HasField("shm_offset") else None
    return Header(key, dtype, shape, start, want, chain, shm)


def build_page(h: Header, k: bytes | memoryview, v: bytes | memoryview,
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


def page_of_buffer(h: Header, buf: torch.Tensor) -> Page:
    """The page of ``h`` viewing ``buf``: ``2 * h.nbytes`` uint8, k's bytes then v's."""
    k, v = buf.view(torch_dtype(h.dtype)).view(2, *h.shape).unbind(0)
    return Page(k, v, h.start_position)


class PutAssembler:
    """Rebuilds the pages of an inline Put byte stream, chunk by chunk."""

    def __init__(self, settings: Settings, buffers: BufferPool) -> None:
        self._settings = settings
        self._buffers = buffers
        self._pending: list[Header] = []  # headers whose bytes have not fully arrived
        self._buf = bytearray()  # bytes of the first pending page received so far
        self.pages: list[tuple[Header, Page]] = []

    def add_headers(self, headers: Sequence[Header]) -> None:
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

    def _complete(self, h: Header, k: memoryview, v: memoryview) -> None:
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
