"""The blob: a fixed 64-byte header, then a payload of 8-byte aligned sections.

Header (little-endian)::

    offset  size  field
         0     4  magic  b"KVTC"
         4     1  version (1)
         5     1  codec            0 none, 1 int8, 2 int4, 3 int4a, 4 int3
         6     1  dtype            0 float16, 1 bfloat16, 2 float32 (``DType.code``)
         7     1  precision        16/8/4/3: the lowest precision the page has passed through
         8    16  layers, tokens, kv_heads, head_dim   (u32 each)
        24     8  start_position   (u64)
        32     4  group_size       (u32, as configured; effective sizes are derived)
        36     4  sink_tokens      (u32: tokens 0..S-1 of the page kept in the page dtype)
        40     2  outliers         (u16: K channels per layer and head kept in the page dtype)
        42     2  key_bits         (u16, int4a and int3: K code bits a token spends per head;
                                   else 0)
        44     2  value_bits       (u16, int3: V code bits per element on average, in 16ths;
                                   else 0)
        46     2  reserved (zero)
        48     8  payload length   (u64)
        56     8  checksum         xxh3-64 over header bytes 0..55 and the payload

Payload of a quantized blob (``T' = tokens - S`` quantized tokens, ``C' = kv_heads *
(head_dim - outliers)`` quantized K channels per token, ``nk``/``nv`` groups)::

    oidx   u16  [L, H, outliers]        outlier channel indices, ascending per (layer, head)
    exps   i16  [L, 2]                  scale-table base exponent per layer for K and for V
    sink   dtype[2, L, S, H, D]         K then V of the attention-sink tokens, as put
    oraw   dtype[L, T', H, outliers]    K outlier channels, as put
    kb     u8   [L, nk, C']             K scale codes (groups run over tokens)
    km     m12  [L, nk, C']             K group minimum, in units of the group scale
    vb     u8   [L, T', nv]             V scale codes (groups run over channels)
    vm     m12  [L, T', nv]             V group minimum, in units of the group scale
    kq     codes[L, T', C']             K codes, row per token (see ``pack``)
    vq     codes[L, T', H*D]            V codes, row per token

An int4a blob adds the key bit map before ``kq`` and packs ``kq`` by it (see
:mod:`kvtier.codecs.int4a`); an int3 blob adds a key and a value bit map and packs both code
sections by them (see :mod:`kvtier.codecs.int3`). A ``none`` blob's payload is K then V as put. See
:mod:`kvtier.codecs.grid` for what the scale codes and ``m12`` mean and
:mod:`kvtier.codecs.pack` for the int4 and m12 byte layouts.
The checksum covers the header too, so a flipped bit anywhere is caught.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import xxhash

from kvtier.errors import CorruptPage
from kvtier.types import DTYPES, Codec, Precision

MAGIC = b"KVTC"
VERSION = 1
HEADER = struct.Struct("<4sBBBBIIIIQIIHHH2xQQ")
HEADER_SIZE = HEADER.size
_SUMMED = HEADER_SIZE - 8
_CHECKSUM = struct.Struct("<Q")  # the last header field
assert HEADER_SIZE == 64

CODEC_IDS: dict[Codec, int] = {Codec.NONE: 0, Codec.INT8: 1, Codec.INT4: 2, Codec.INT4A: 3,
                               Codec.INT3: 4}
_CODECS = {v: k for k, v in CODEC_IDS.items()}
_DTYPE_CODES = {d.name: d.code for d in DTYPES.values()}
_DTYPE_NAMES = {d.code: d.name for d in DTYPES.values()}
_PRECISIONS = {int(p): p for p in Precision}
_BITS = {c: c.bits for c in Codec}
_KEY_WIDTHS = {Codec.INT4A: 2, Codec.INT3: 1}  # the narrowest K code of the codecs with a map
_LIMIT = 1 << 31  # no dimension of a real page comes near this; beyond it a header is corrupt


class BlobHeader(NamedTuple):
    """What a blob says about itself, read without touching the payload.

    A NamedTuple rather than a frozen dataclass: :func:`read_header` builds one per blob
    read, in about 0.3 us against 1.2 (change a field with ``h._replace(...)``).
    """

    codec: Codec
    dtype: str
    shape: tuple[int, int, int, int]
    start_position: int
    precision: Precision
    nbytes: int  # the whole blob
    group_size: int
    sink_tokens: int
    outliers: int
    payload_nbytes: int
    checksum: int
    key_bits: int = 0  # int4a: K code bits per token and head (2..8 per quantized channel)
    value_bits: int = 0  # int3: V code bits per element on average, in 16ths (16..64)

    @property
    def page_nbytes(self) -> int:
        """Bytes of the decoded page (K and V)."""
        L, T, H, D = self.shape
        return 2 * L * T * H * D * DTYPES[self.dtype].itemsize


def checksum(head: bytes | memoryview, payload: bytes | memoryview) -> int:
    """xxh3-64 of the first 56 header bytes, chained into the payload's hash by seed."""
    return xxhash.xxh3_64_intdigest(payload, seed=xxhash.xxh3_64_intdigest(head))


def pack_header(h: BlobHeader) -> bytearray:
    """The 64 header bytes with the checksum field as given in ``h``."""
    buf = bytearray(HEADER_SIZE)
    pack_header_into(buf, h.codec, h.dtype, h.shape, h.start_position, h.precision,
                     h.group_size, h.sink_tokens, h.outliers, h.payload_nbytes,
                     key_bits=h.key_bits, value_bits=h.value_bits, checksum=h.checksum)
    return buf


def pack_header_into(buf: bytearray, codec: Codec, dtype: str,
                     shape: tuple[int, int, int, int], start_position: int,
                     precision: Precision, group_size: int, sink_tokens: int, outliers: int,
                     payload_nbytes: int, *, key_bits: int = 0, value_bits: int = 0,
                     checksum: int = 0) -> None:
    """:func:`pack_header` from the fields, into the first 64 bytes of ``buf``.

    The encoder's per-page path: no BlobHeader is built, the fields go straight into ``buf``.
    """
    L, T, H, D = shape
    HEADER.pack_into(buf, 0, MAGIC, VERSION, CODEC_IDS[codec], _DTYPE_CODES[dtype],
                     int(precision), L, T, H, D, start_position, group_size, sink_tokens,
                     outliers, key_bits, value_bits, payload_nbytes, checksum)


def seal(buf: bytearray) -> bytes:
    """Fill in the checksum of a header+payload buffer (header packed at offset 0)."""
    with memoryview(buf) as mv:
        _CHECKSUM.pack_into(buf, _SUMMED, checksum(mv[:_SUMMED], mv[HEADER_SIZE:]))
    return bytes(buf)


def read_header(blob: bytes | bytearray | memoryview) -> BlobHeader:
    """Parse and sanity-check the header; raises CorruptPage. Does not verify the checksum."""
    n = len(blob)
    if n < HEADER_SIZE:
        raise CorruptPage(f"blob is {n} bytes, shorter than the {HEADER_SIZE}-byte header",
                          field="blob")
    (magic, version, codec_id, dtype_id, prec, L, T, H, D, start, group, sinks, outliers,
     key_bits, value_bits, payload_len, csum) = HEADER.unpack_from(blob, 0)
    if magic != MAGIC:
        raise CorruptPage(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}", field="blob.magic")
    if version != VERSION:
        raise CorruptPage(f"unknown blob version {version}", field="blob.version")
    codec = _CODECS.get(codec_id)
    dtype = _DTYPE_NAMES.get(dtype_id)
    if codec is None:
        raise CorruptPage(f"unknown codec id {codec_id}", field="blob.codec")
    if dtype is None:
        raise CorruptPage(f"unknown dtype id {dtype_id}", field="blob.dtype")
    precision = _PRECISIONS.get(prec)
    if precision is None or prec > _BITS[codec]:
        raise CorruptPage(f"precision {prec} impossible for codec {codec.value}",
                          field="blob.precision")
    if not (0 < L < _LIMIT and 0 < T < _LIMIT and 0 < H < _LIMIT and 0 < D < _LIMIT) \
            or sinks > T or outliers > D:
        raise CorruptPage(f"impossible geometry {[L, T, H, D]}, sinks {sinks}, outliers "
                          f"{outliers}", field="blob.shape")
    kept = D - outliers
    lo = _KEY_WIDTHS.get(codec)
    if (key_bits != 0 or lo is not None) and not (
            lo is not None and lo * kept <= key_bits <= 8 * kept):
        raise CorruptPage(f"key_bits {key_bits} impossible for codec {codec.value} with "
                          f"{kept} quantized K channels", field="blob.key_bits")
    if (value_bits != 0 or codec is Codec.INT3) and not (
            codec is Codec.INT3 and 16 <= value_bits <= 64):
        raise CorruptPage(f"value_bits {value_bits} impossible for codec {codec.value}",
                          field="blob.value_bits")
    if payload_len != n - HEADER_SIZE:
        raise CorruptPage(f"header says {payload_len} payload bytes, blob holds "
                          f"{n - HEADER_SIZE}", field="blob.length")
    return BlobHeader(codec, dtype, (L, T, H, D), start, precision, n, group, sinks, outliers,
                      payload_len, csum, key_bits, value_bits)


def verify(blob: bytes | bytearray | memoryview) -> BlobHeader:
    """read_header plus the checksum over header and payload; raises CorruptPage."""
    h = read_header(blob)
    mv = memoryview(blob)
    got = checksum(mv[:_SUMMED], mv[HEADER_SIZE:])
    if got != h.checksum:
        raise CorruptPage(f"checksum mismatch (stored {h.checksum:#018x}, computed "
                          f"{got:#018x})", field="blob.checksum")
    return h
