"""Row-level numba helpers for the CPU kernels: conversions, the grid, code packing
(the LLVM intrinsics they build on are in :mod:`kvtier.codecs.cpu.intrinsics`).

Every helper works on 0-based slices: numba then knows indices are not negative, skips its
wrap-around handling and LLVM vectorizes the loops (AVX2 here, F16C for float16).
Conversions are bit-exact with torch: LLVM ``fptrunc``/``fpext`` for float16 (IEEE
round-to-nearest-even), the usual round-to-nearest-even bit trick for bfloat16.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import njit

from kvtier.codecs.cpu.intrinsics import (
    bits_to_f32, bits_to_f64, f16_to_f32, f32_to_bits, f32_to_f16, lrint, minmax8, prefetch,
)

CACHE = True  # numba's on-disk cache next to the module: compile once per machine
JIT: dict[str, Any] = {"nogil": True, "cache": CACHE}
INLINE: dict[str, Any] = {"nogil": True, "cache": CACHE, "inline": "always"}


@njit(**INLINE)
def share_size(n, parts, itemsize):  # type: ignore[no-untyped-def]
    """Elements per share when ``n`` elements are prefetched in ``parts`` shares: whole cache
    lines, computed once per span (an integer divide per row costs more than it saves)."""
    step = 64 // itemsize
    return ((n + parts - 1) // parts + step - 1) // step * step


@njit(**INLINE)
def prefetch_share(arr, start, end, part, per):  # type: ignore[no-untyped-def]
    """Prefetch share ``part`` (``per`` elements, see :func:`share_size`) of
    ``arr[start:end]``, one call per cache line.

    Called once per row while a layer is worked on, with the span needed next: it then
    arrives from memory while this layer computes, instead of stalling its first pass.
    (Spread out, because the core tracks only a few dozen misses at a time.)
    """
    a = start + part * per
    b = min(end, a + per)
    for i in range(a, b, 64 // arr.itemsize):
        prefetch(arr, i)


@njit(**INLINE)
def load_row(src, kind, dst):  # type: ignore[no-untyped-def]
    """Convert the elements in word slice ``src`` (dtype ``kind``) into float32 ``dst``."""
    n = dst.size
    if kind == 0:
        for i in range(n):
            dst[i] = f16_to_f32(src[i])
    elif kind == 1:
        for i in range(n):
            dst[i] = bits_to_f32(np.uint32(src[i]) << np.uint32(16))
    else:
        for i in range(n):
            lo = np.uint32(src[2 * i])
            hi = np.uint32(src[2 * i + 1])
            dst[i] = bits_to_f32(lo | (hi << np.uint32(16)))


@njit(**INLINE)
def _bf16(x):  # type: ignore[no-untyped-def]
    """float32 -> bfloat16 bits, round to nearest even (as torch rounds)."""
    u = f32_to_bits(x)
    u = u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
    return np.uint16(u >> np.uint32(16))


@njit(**INLINE)
def dequant_store(q, m, s, step, kind, dst):  # type: ignore[no-untyped-def]
    """``dst`` (words, dtype ``kind``) = ``(q * step + m) * s`` per element (float32 arrays
    ``m``, ``s`` as long as ``q``).

    ``m + step * q`` is an integer below 2**24, so the float32 sum is exact and the product
    rounds once, as the reference's ``float(m + step * q) * s`` does; the result is rounded
    to the page dtype in the same loop (one pass, no float32 row in between).
    """
    n = q.size
    if kind == 0:
        for i in range(n):
            dst[i] = f32_to_f16((np.float32(q[i]) * step + m[i]) * s[i])
    elif kind == 1:
        for i in range(n):
            dst[i] = _bf16((np.float32(q[i]) * step + m[i]) * s[i])
    else:
        for i in range(n):
            u = f32_to_bits((np.float32(q[i]) * step + m[i]) * s[i])
            dst[2 * i] = np.uint16(u & np.uint32(0xFFFF))
            dst[2 * i + 1] = np.uint16(u >> np.uint32(16))


@njit(**INLINE)
def dequant_store_group(q, m, s, step, kind, dst):  # type: ignore[no-untyped-def]
    """:func:`dequant_store` for one group: scalar minimum ``m`` and scale ``s``."""
    n = q.size
    if kind == 0:
        for i in range(n):
            dst[i] = f32_to_f16((np.float32(q[i]) * step + m) * s)
    elif kind == 1:
        for i in range(n):
            dst[i] = _bf16((np.float32(q[i]) * step + m) * s)
    else:
        for i in range(n):
            u = f32_to_bits((np.float32(q[i]) * step + m) * s)
            dst[2 * i] = np.uint16(u & np.uint32(0xFFFF))
            dst[2 * i + 1] = np.uint16(u >> np.uint32(16))


@njit(**INLINE)
def copy(dst, src):  # type: ignore[no-untyped-def]
    """``dst[:n] = src`` as a plain loop (numba's slice assignment is ~100x slower)."""
    for i in range(src.size):
        dst[i] = src[i]


@njit(**INLINE)
def bounds_row(row, mnr, mxr):  # type: ignore[no-untyped-def]
    """Elementwise running min/max of a row into ``mnr``/``mxr``.

    Written as select-then-add-zero: a plain ``a[c] = min(a[c], x)`` becomes a masked store
    (vmaskmovps), which is microcoded and ~10x slower on AMD cores. Adding +0.0 only turns a
    -0.0 bound into +0.0, which changes no byte of the blob (|min| and floor(min/s) agree).
    """
    for c in range(row.size):
        x = row[c]
        a = mnr[c]
        b = mxr[c]
        mnr[c] = (x if x < a else a) + np.float32(0)
        mxr[c] = (x if x > b else b) + np.float32(0)


@njit(**INLINE)
def group_bounds(row, a, e):  # type: ignore[no-untyped-def]
    """(min, max) of ``row[a:e]`` (C-contiguous float32): whole vectors of 8 in
    :func:`minmax8`, the rest one by one. Offsets rather than a slice: a numba slice per
    64-value group costs as much as the reduction itself."""
    n8 = (e - a) // 8
    if n8:
        lo, hi = minmax8(row, a, n8)
    else:
        lo = row[a]
        hi = row[a]
    for j in range(a + 8 * n8, e):
        x = row[j]
        lo = x if x < lo else lo
        hi = x if x > hi else hi
    return lo, hi


@njit(**INLINE)
def table(e0, mant):  # type: ignore[no-untyped-def]
    """The 256 scales of a layer (float64 holding float32 values), see kvtier.codecs.grid."""
    tab = np.empty(256, np.float64)
    p = math.ldexp(1.0, e0)
    for octave in range(16):  # doubling is exact: every entry is a float32 value
        for i in range(16):
            tab[16 * octave + i] = mant[i] * p
        p *= 2.0
    return tab


@njit(**INLINE)
def choose(mn, mx, mant, b_out, m_out, inv, mf):  # type: ignore[no-untyped-def]
    """Grid of every group from float32 bounds (kvtier.codecs.grid.choose); returns ``e0``.

    Branch-free loops over all groups: the scale code comes from the exponent and mantissa
    bits of ``need`` (16 comparisons against the table's mantissas), which is exactly the
    smallest ``b`` with ``table[b] >= need`` that the reference's searchsorted finds.
    The largest ``need`` is found on its bits: for doubles >= 0 the integer order is the
    value order, and an integer max vectorizes where a float max (NaN rules) does not.
    Loops kept apart on purpose: fusing the last two measured twice as slow.
    """
    n = mn.size
    need = np.empty(n, np.float64)
    bits = need.view(np.uint64)
    ibits = need.view(np.int64)
    for i in range(n):
        lo = np.float64(mn[i])
        need[i] = max((np.float64(mx[i]) - lo) / 254.0, abs(lo) / 2047.0)
    top = np.int64(0)
    for i in range(n):
        top = max(top, ibits[i])
    # frexp's exponent of the largest need: biased exponent - 1022, and 0 for 0.0
    e0 = min(max((0 if top == 0 else (top >> 52) - 1022) - 15, -126), 111)
    tab = table(e0, mant)
    one = np.uint64(1023) << np.uint64(52)
    frac = np.uint64((1 << 52) - 1)
    for i in range(n):
        u = bits[i]
        e = np.int64(u >> np.uint64(52)) - 1023  # need > 0 is normal or 0 (then e < e0)
        m = bits_to_f64((u & frac) | one)  # the mantissa in [1, 2)
        j = 0
        for k in range(16):
            j += 1 if mant[k] < m else 0
        b = min(max(16 * (e - e0) + j, 0), 255)
        b_out[i] = b
    for i in range(n):
        s = tab[b_out[i]]
        m = min(max(np.floor(np.float64(mn[i]) / s), -2048.0), 2047.0)
        m_out[i] = np.int32(m)
        inv[i] = np.float32(1.0) / np.float32(s)
        mf[i] = np.float32(m)
    return e0


@njit(**INLINE)
def put_m12(out, m):  # type: ignore[no-untyped-def]
    """Pack signed minima ``m`` into ``out`` (three bytes per pair; see kvtier.codecs.pack)."""
    n = m.size
    for p in range(n // 2):
        u0 = np.int64(m[2 * p]) & 0xFFF
        u1 = np.int64(m[2 * p + 1]) & 0xFFF
        out[3 * p] = np.uint8(u0 & 0xFF)
        out[3 * p + 1] = np.uint8(u1 & 0xFF)
        out[3 * p + 2] = np.uint8((u0 >> 8) | ((u1 >> 8) << 4))
    if n % 2:
        u0 = np.int64(m[n - 1]) & 0xFFF
        p = n // 2
        out[3 * p] = np.uint8(u0 & 0xFF)
        out[3 * p + 1] = 0
        out[3 * p + 2] = np.uint8(u0 >> 8)


@njit(**INLINE)
def get_m12(src, first, m):  # type: ignore[no-untyped-def]
    """Unpack minima ``first .. first + m.size`` of the packed array ``src`` into ``m``."""
    for j in range(m.size):
        i = first + j
        p = 3 * (i // 2)
        if i % 2 == 0:
            u = np.int64(src[p]) | ((np.int64(src[p + 2]) & 0x0F) << 8)
        else:
            u = np.int64(src[p + 1]) | ((np.int64(src[p + 2]) >> 4) << 8)
        m[j] = u - 4096 if u >= 2048 else u


@njit(**INLINE)
def _code(y, top):  # type: ignore[no-untyped-def]
    """``clamp(rint(y), 0, top)`` as uint8, in integers: LLVM turns this into ``vcvtps2dq``
    and a saturating byte store, two vector ops fewer than rounding and clamping in float.
    Equal to the float version for every ``|y| < 2**31``; a code's ``y`` is within a few
    thousand by construction of the grid (``s >= |min| / 2047`` and ``>= (max - min) / 254``).
    """
    return np.uint8(min(max(lrint(y), np.int32(0)), np.int32(top)))


# int4 codes are ``rint(y / 17)``; multiplying by the float32 reciprocal gives the same integer
# for every float32 ``y`` in [-3, 300] (checked exhaustively, tests/codecs/test_codec_kernels.py;
# outside it both clamp alike), and a multiply costs a fraction of a vector divide.
R17 = np.float32(1.0) / np.float32(17.0)


@njit(**INLINE)
def quantize_row(x, inv, mf, bits, q):  # type: ignore[no-untyped-def]
    """Codes of float32 ``x`` into ``q`` with a per-element grid (arrays ``inv``, ``mf``)."""
    if bits == 8:
        for j in range(x.size):
            q[j] = _code(x[j] * inv[j] - mf[j], 255)
    else:
        for j in range(x.size):
            q[j] = _code((x[j] * inv[j] - mf[j]) * R17, 15)


@njit(**INLINE)
def quantize_flat(x, inv, mf, bits, q):  # type: ignore[no-untyped-def]
    """Codes of float32 slice ``x`` into ``q`` with one grid (scalars ``inv``, ``mf``)."""
    if bits == 8:
        for j in range(x.size):
            q[j] = _code(x[j] * inv - mf, 255)
    else:
        for j in range(x.size):
            q[j] = _code((x[j] * inv - mf) * R17, 15)


@njit(**INLINE)
def put_codes(q, bits, out):  # type: ignore[no-untyped-def]
    """Store a row of codes into byte slice ``out`` (int4: two a byte, low nibble first)."""
    n = q.size
    if bits == 8:
        for j in range(n):
            out[j] = q[j]
    else:
        for j in range(n // 2):
            out[j] = q[2 * j] | (q[2 * j + 1] << np.uint8(4))
        if n % 2:
            out[n // 2] = q[n - 1]


@njit(**INLINE)
def get_codes(src, bits, q):  # type: ignore[no-untyped-def]
    """Load a row of codes from byte slice ``src`` into ``q``."""
    n = q.size
    if bits == 8:
        for j in range(n):
            q[j] = src[j]
    else:
        for j in range(n // 2):
            byte = src[j]
            q[2 * j] = byte & np.uint8(0x0F)
            q[2 * j + 1] = byte >> np.uint8(4)
        if n % 2:
            q[n - 1] = src[n // 2] & np.uint8(0x0F)
