"""Where each section of a blob's payload lies, derived from the header alone.

Encoder and decoder both build a :class:`Layout` from the same few numbers (shape, dtype,
codec, group size, sink tokens, outliers), so the payload needs no table of contents.
Sections start on 8-byte boundaries so that every one can be viewed as a typed array.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvtier.codecs.blob import HEADER_SIZE, BlobHeader
from kvtier.codecs.grid import E0_MAX, E0_MIN
from kvtier.config import CodecConfig
from kvtier.errors import CorruptPage
from kvtier.types import DTYPES, Codec

QUANTIZED_SECTIONS = ("oidx", "exps", "sink", "oraw", "kb", "km", "vb", "vm", "kq", "vq")


def _align(n: int) -> int:
    return (n + 7) & ~7


def sink_count(tokens: int, start_position: int, sink_tokens: int) -> int:
    """How many leading tokens of a page are attention sinks (absolute position < sink_tokens)."""
    s = sink_tokens - start_position
    return 0 if s <= 0 else min(tokens, s)


def outlier_count(head_dim: int, quantized_tokens: int, fraction: float, minimum: int) -> int:
    """K channels per (layer, head) kept as put: ``fraction * head_dim``, at least ``minimum``.

    No outliers when no token is quantized (every token is a sink).
    """
    if quantized_tokens == 0:
        return 0
    return min(head_dim, max(minimum, int(fraction * head_dim)))


def m12_nbytes(n: int) -> int:
    """Bytes of ``n`` packed 12-bit minima (three bytes per pair)."""
    return 3 * ((n + 1) // 2)


@dataclass(frozen=True, slots=True)
class Layout:
    """Geometry of one quantized (or raw) page and the byte offsets of its payload sections."""

    codec: Codec
    dtype: str
    L: int
    T: int
    H: int
    D: int
    S: int  # sink tokens
    n_out: int  # outlier channels per (layer, head)
    group_size: int
    sections: tuple[tuple[str, int, int], ...]  # (name, offset in blob, nbytes), in order
    payload_nbytes: int = 0
    key_bits: int = 0  # int4a, int3: K code bits per token and head
    # what the CPU page kernels take: section bounds in QUANTIZED_SECTIONS order and the
    # geometry (kind, L, T, S, H, D, n_out, Gk, Gv, bits), as read-only int64 arrays
    plan: tuple[Any, Any] | None = field(default=None, compare=False, hash=False, repr=False)
    value_bits: int = 0  # int3: V code bits per element on average, in 16ths

    @property
    def offsets(self) -> dict[str, tuple[int, int]]:
        """section -> (offset in blob, nbytes)."""
        return {name: (off, n) for name, off, n in self.sections}

    @property
    def Tq(self) -> int:
        """Quantized tokens."""
        return self.T - self.S

    @property
    def Ck(self) -> int:
        """Quantized K channels per token (outlier channels excluded)."""
        return self.H * (self.D - self.n_out)

    @property
    def HD(self) -> int:
        return self.H * self.D

    @property
    def Gk(self) -> int:
        """K group length in tokens, clipped to the quantized tokens of the page."""
        return max(1, min(self.group_size, self.Tq))

    @property
    def nk(self) -> int:
        return -(-self.Tq // self.Gk)

    @property
    def Gv(self) -> int:
        """V group length in channels, clipped to the channels of a token."""
        return min(self.group_size, self.HD)

    @property
    def nv(self) -> int:
        return -(-self.HD // self.Gv)

    @property
    def esize(self) -> int:
        return DTYPES[self.dtype].itemsize

    def section(self, name: str) -> tuple[int, int]:
        for sec, off, n in self.sections:
            if sec == name:
                return off, n
        raise KeyError(name)

    def row_bytes(self, n: int) -> int:
        """Bytes of one row of ``n`` codes: one per code for int8, two codes a byte for int4."""
        return n if self.codec is Codec.INT8 else (n + 1) // 2

    @property
    def kq_row_bytes(self) -> int:
        """Bytes of one token's K codes (int4a: ``H * key_bits`` bits of 2..8-bit codes)."""
        if self.codec in (Codec.INT4A, Codec.INT3):
            return (self.H * self.key_bits + 7) // 8
        return self.row_bytes(self.Ck)

    @property
    def v_budget(self) -> int:
        """int3: the V code widths of a layer's ``T' nv`` groups add up to this (each 1..4)."""
        n = self.Tq * self.nv
        return min(4 * n, max(n, (self.value_bits * n + 8) // 16))

    @property
    def vq_layer_bytes(self) -> int:
        """int3: bytes of one layer's V codes (a bit string; ``v_budget * Gv`` bits at most)."""
        return (self.v_budget * self.Gv + 7) // 8


@functools.lru_cache(maxsize=1024)
def make_layout(codec: Codec, dtype: str, shape: tuple[int, int, int, int], S: int, n_out: int,
                group_size: int, key_bits: int = 0, value_bits: int = 0) -> Layout:
    """The layout of a blob (memoized: a pure function of a few numbers, called per page)."""
    L, T, H, D = shape
    es = DTYPES[dtype].itemsize
    sizes: list[tuple[str, int]]
    if codec is Codec.NONE:
        sizes = [("kraw", L * T * H * D * es), ("vraw", L * T * H * D * es)]
    else:
        probe = Layout(codec, dtype, L, T, H, D, S, n_out, group_size, (), key_bits=key_bits,
                       value_bits=value_bits)
        Tq, Ck, HD = probe.Tq, probe.Ck, probe.HD
        nk = probe.nk if Tq else 0
        kgroups, vgroups = L * nk * Ck, L * Tq * probe.nv
        sizes = [
            ("oidx", 2 * L * H * n_out),
            ("exps", 2 * L * 2),
            ("sink", 2 * L * S * H * D * es),
            ("oraw", L * Tq * H * n_out * es),
            ("kb", kgroups), ("km", m12_nbytes(kgroups)),
            ("vb", vgroups), ("vm", m12_nbytes(vgroups)),
            *([("kbits", L * ((Ck + 1) // 2) if Tq else 0)]
              if codec in (Codec.INT4A, Codec.INT3) else []),
            *([("vbits", L * ((Tq * probe.nv + 3) // 4))] if codec is Codec.INT3 else []),
            ("kq", L * Tq * probe.kq_row_bytes),
            ("vq", L * probe.vq_layer_bytes if codec is Codec.INT3
             else L * Tq * probe.row_bytes(HD)),
        ]
    sections = []
    pos = HEADER_SIZE
    for name, n in sizes:
        sections.append((name, pos, n))
        pos = _align(pos + n)
    lay = Layout(codec, dtype, L, T, H, D, S, n_out, group_size, tuple(sections),
                 pos - HEADER_SIZE, key_bits, value_bits=value_bits)
    if codec not in (Codec.INT8, Codec.INT4):
        return lay  # the page kernels handle int8 and int4; int4a and int3 go through int8
    offsets = lay.offsets
    bounds = np.array([x for name in QUANTIZED_SECTIONS
                       for x in (offsets[name][0], offsets[name][0] + offsets[name][1])],
                      dtype=np.int64)
    geo = np.array([DTYPES[dtype].code, L, T, S, H, D, n_out, lay.Gk, lay.Gv, codec.bits],
                   dtype=np.int64)
    bounds.flags.writeable = False
    geo.flags.writeable = False
    return dataclasses.replace(lay, plan=(bounds, geo))


def layout_for_encode(codec: Codec, dtype: str, shape: tuple[int, int, int, int],
                      start_position: int, params: CodecConfig) -> Layout:
    """The layout :func:`~kvtier.codecs.codec.encode` writes for a page.

    Memoized on what it depends on (the sink count, not the start position; the parameters'
    fields, which hash faster than the model): about 0.5 us a page instead of 1.4.
    """
    S = 0 if codec is Codec.NONE else sink_count(shape[1], start_position, params.sink_tokens)
    return _encode_layout(codec, dtype, shape, S, params.group_size, params.outlier_fraction,
                          params.min_outlier_channels)


@functools.lru_cache(maxsize=1024)
def _encode_layout(codec: Codec, dtype: str, shape: tuple[int, int, int, int], S: int,
                   group_size: int, outlier_fraction: float, min_outliers: int) -> Layout:
    n_out = 0 if codec is Codec.NONE else outlier_count(shape[3], shape[1] - S,
                                                        outlier_fraction, min_outliers)
    return make_layout(codec, dtype, tuple(shape), S, n_out, group_size)


def layout_of(h: BlobHeader) -> Layout:
    return make_layout(h.codec, h.dtype, h.shape, h.sink_tokens, h.outliers, h.group_size,
                       h.key_bits, h.value_bits)


def check_indices(blob: bytes | bytearray | memoryview, lay: Layout) -> None:
    """Reject a blob whose outlier indices or scale exponents are out of range.

    The checksum catches accidents, not a forged blob (Redis is shared), and the CPU kernels
    do not bounds-check, so the few values they index with are checked before decoding.
    """
    if lay.codec is Codec.NONE or lay.Tq == 0:
        return
    arr = np.frombuffer(blob, dtype=np.uint8)
    off, n = lay.section("oidx")
    oidx = arr[off:off + n].view(np.int16).reshape(lay.L * lay.H, lay.n_out)
    if oidx.size and (int(oidx.min()) < 0 or int(oidx.max()) >= lay.D
                      or (lay.n_out > 1 and bool((np.diff(oidx, axis=1) <= 0).any()))):
        raise CorruptPage("outlier channel indices out of range or not ascending",
                          field="blob.outliers")
    off, n = lay.section("exps")
    exps = arr[off:off + n].view(np.int16)
    if int(exps.min()) < E0_MIN or int(exps.max()) > E0_MAX:
        raise CorruptPage("scale exponents out of range", field="blob.scales")
