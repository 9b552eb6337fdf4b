"""numba kernels for int4a's code maps on the CPU (the torch code in :mod:`kvtier.codecs.alloc`
is the reference and the device path; the tests hold both to the same bytes).

Arrays are flat uint8. ``bits`` is ``[L, C']``; K codes are ``[L, T', C']`` int8 codes on one
side and rows of ``rb`` bytes on the other (channel ``c``'s code at bit ``sum(bits[:c])`` of its
token's row, little-endian).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from kvtier.codecs.rowops import JIT


@njit(**JIT)
def _offsets(bits, layer, C):  # type: ignore[no-untyped-def]
    off = np.empty(C, np.int64)
    acc = 0
    for c in range(C):
        off[c] = acc
        acc += bits[layer * C + c]
    return off


@njit(**JIT)
def pack_keys(q8, L, T, C, bits, rb, out):  # type: ignore[no-untyped-def]
    """int8 K codes -> rows of ``bits``-wide codes ``round(q8 (2^b - 1) / 255)``; ``out`` is
    zeroed."""
    for layer in range(L):
        off = _offsets(bits, layer, C)
        for t in range(T):
            src = (layer * T + t) * C
            base = (layer * T + t) * rb
            for c in range(C):
                lv = (np.int32(1) << bits[layer * C + c]) - 1
                j = (2 * np.int32(q8[src + c]) * lv + 255) // 510
                v = j << (off[c] & 7)
                at = base + (off[c] >> 3)
                out[at] |= np.uint8(v & 0xFF)
                if v > 0xFF:
                    out[at + 1] |= np.uint8(v >> 8)


@njit(**JIT)
def unpack_keys(rows, L, T, C, bits, rb, out):  # type: ignore[no-untyped-def]
    """Rows of ``bits``-wide K codes -> the int8 codes they stand for,
    ``round(q 255 / (2^b - 1))``."""
    for layer in range(L):
        off = _offsets(bits, layer, C)
        for t in range(T):
            base = (layer * T + t) * rb
            end = base + rb
            dst = (layer * T + t) * C
            for c in range(C):
                b = bits[layer * C + c]
                lv = (np.int32(1) << b) - 1
                at = base + (off[c] >> 3)
                word = np.int32(rows[at])
                if at + 1 < end:
                    word |= np.int32(rows[at + 1]) << 8
                j = (word >> (off[c] & 7)) & lv
                out[dst + c] = np.uint8((510 * j + lv) // (2 * lv))


@njit(**JIT)
def int4_rows_to_int8(src, rows, width, dst):  # type: ignore[no-untyped-def]
    """Packed int4 rows -> int8 codes on the same grid, ``q8 = 17 q4``."""
    rb = (width + 1) // 2
    for r in range(rows):
        for j in range(width):
            byte = src[r * rb + (j >> 1)]
            q = byte & 0x0F if j % 2 == 0 else byte >> 4
            dst[r * width + j] = np.uint8(17 * q)
