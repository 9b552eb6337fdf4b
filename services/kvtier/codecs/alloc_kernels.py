"""numba kernels for int4a on the CPU: the key bit allocation and the code maps (the torch code
in :mod:`kvtier.codecs.alloc` is the reference and the device path; the tests and
:func:`kvtier.codecs.alloc.self_test` hold both to the same bytes).

Arrays are flat uint8. ``bits`` is ``[L, C']``; K codes are ``[L, T', C']`` int8 codes on one
side and rows of ``rb`` bytes on the other (channel ``c``'s code at bit ``sum(bits[:c])`` of its
token's row, little-endian).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from kvtier.codecs.rowops import JIT


def _tables() -> tuple[np.ndarray, np.ndarray]:
    """``TO_B[b, q8]``: the ``b``-bit code of an int8 code; ``TO_8[b, q]``: the int8 code of a
    ``b``-bit code (the integer maps of :mod:`kvtier.codecs.alloc`, as lookup tables)."""
    to_b = np.zeros((9, 256), np.uint8)
    to_8 = np.zeros((9, 256), np.uint8)
    q = np.arange(256, dtype=np.int64)
    for b in range(1, 9):
        lv = (1 << b) - 1
        to_b[b] = (2 * q * lv + 255) // 510
        to_8[b, :lv + 1] = (510 * q[:lv + 1] + lv) // (2 * lv)
    return to_b, to_8


TO_B, TO_8 = _tables()


@njit(**JIT)
def pack_keys(q8, L, T, C, bits, rb, out, to_b):  # type: ignore[no-untyped-def]
    """int8 K codes -> rows of ``bits``-wide codes ``round(q8 (2^b - 1) / 255)`` (every byte
    of ``out`` written). A row's bits gather in a 64-bit word, stored 4 bytes at a time."""
    width = np.empty(C, np.int64)
    for layer in range(L):
        for c in range(C):
            width[c] = np.int64(bits[layer * C + c])
        for t in range(T):
            src = (layer * T + t) * C
            pos = (layer * T + t) * rb
            acc = np.uint64(0)
            nb = np.int64(0)
            for c in range(C):
                w = width[c]
                acc |= np.uint64(to_b[w, q8[src + c]]) << np.uint64(nb)
                nb += w
                if nb >= 32:
                    out[pos] = np.uint8(acc & np.uint64(0xFF))
                    out[pos + 1] = np.uint8((acc >> np.uint64(8)) & np.uint64(0xFF))
                    out[pos + 2] = np.uint8((acc >> np.uint64(16)) & np.uint64(0xFF))
                    out[pos + 3] = np.uint8((acc >> np.uint64(24)) & np.uint64(0xFF))
                    acc >>= np.uint64(32)
                    nb -= 32
                    pos += 4
            end = (layer * T + t + 1) * rb
            while pos < end:
                out[pos] = np.uint8(acc & np.uint64(0xFF))
                acc >>= np.uint64(8)
                pos += 1


@njit(**JIT)
def unpack_keys(rows, L, T, C, bits, rb, out, to_8):  # type: ignore[no-untyped-def]
    """Rows of ``bits``-wide K codes -> the int8 codes they stand for,
    ``round(q 255 / (2^b - 1))``. A row is read 4 bytes at a time into a 64-bit word."""
    width = np.empty(C, np.int64)
    for layer in range(L):
        for c in range(C):
            width[c] = np.int64(bits[layer * C + c])
        for t in range(T):
            pos = (layer * T + t) * rb
            end = pos + rb
            dst = (layer * T + t) * C
            acc = np.uint64(0)
            nb = np.int64(0)
            for c in range(C):
                w = width[c]
                if nb < w:  # w <= 8, so 4 more bytes (or the row's last ones) cover it
                    for i in range(4):
                        if pos < end:
                            acc |= np.uint64(rows[pos]) << np.uint64(nb)
                            pos += 1
                        nb += 8
                q = acc & ((np.uint64(1) << np.uint64(w)) - np.uint64(1))
                out[dst + c] = to_8[w, q]
                acc >>= np.uint64(w)
                nb -= w


@njit(**JIT)
def int4_rows_to_int8(src, rows, width, dst):  # type: ignore[no-untyped-def]
    """Packed int4 rows -> int8 codes on the same grid, ``q8 = 17 q4``."""
    rb = (width + 1) // 2
    for r in range(rows):
        for j in range(width):
            byte = src[r * rb + (j >> 1)]
            q = byte & 0x0F if j % 2 == 0 else byte >> 4
            dst[r * width + j] = np.uint8(17 * q)


@njit(**JIT)
def _m12(src, i):  # type: ignore[no-untyped-def]
    p = 3 * (i // 2)
    if i % 2 == 0:
        u = np.int64(src[p]) | ((np.int64(src[p + 2]) & 0x0F) << 8)
    else:
        u = np.int64(src[p + 1]) | ((np.int64(src[p + 2]) >> 4) << 8)
    return u - 4096 if u >= 2048 else u


@njit(**JIT)
def _before(gains, a, b):  # type: ignore[no-untyped-def]
    """Whether move ``a`` sorts before move ``b``: the larger gain, then the earlier move (the
    order of a stable descending sort)."""
    return gains[a] > gains[b] or (gains[a] == gains[b] and a < b)


@njit(**JIT)
def _select(gains, order, k):  # type: ignore[no-untyped-def]
    """Reorder ``order`` so that its first ``k`` entries are the ``k`` moves a stable
    descending sort of ``gains`` puts first (in some order): quickselect on a strict total
    order, so the set is exactly the sort's."""
    lo = 0
    hi = order.size - 1
    while lo < hi and 0 < k <= hi:
        if hi == lo + 1:  # two left: put them in order
            if _before(gains, order[hi], order[lo]):
                order[lo], order[hi] = order[hi], order[lo]
            return
        mid = (lo + hi) // 2
        # median of three as the pivot, moved to hi
        a, b, c = order[lo], order[mid], order[hi]
        if _before(gains, b, a):
            a, b = b, a
        if _before(gains, c, b):
            b, c = c, b
            if _before(gains, b, a):
                a, b = b, a
        order[lo], order[mid], order[hi] = a, c, b
        pivot = b
        store = lo
        for i in range(lo, hi):
            if _before(gains, order[i], pivot):
                order[store], order[i] = order[i], order[store]
                store += 1
        order[store], order[hi] = order[hi], order[store]
        if store == k or store == k - 1:
            return
        if store < k:
            lo = store + 1
        else:
            hi = store - 1


@njit(**JIT)
def allocate_keys(  # type: ignore[no-untyped-def]
        kb, km, e0, mant, L, nk, Gk, Tq, H, D, n_out, oidx, opeak, drop, budget, out):
    """Bits of every quantized K channel (``out`` ``[L, C']``), the same numbers as
    :func:`kvtier.codecs.alloc.key_weights` then :func:`~kvtier.codecs.alloc.allocate` (same
    float64 operations in the same order, the same stable sort)."""
    Dk = D - n_out
    C = H * Dk
    nm = drop.size
    for layer in range(L):
        peak = np.zeros(H * D)
        kidx = np.empty(C, np.int64)
        j = 0
        for h in range(H):
            for d in range(D):
                kept = True
                for o in range(n_out):
                    if oidx[(layer * H + h) * n_out + o] == d:
                        kept = False
                if kept:
                    kidx[j] = h * D + d
                    j += 1
            for o in range(n_out):
                peak[h * D + oidx[(layer * H + h) * n_out + o]] = opeak[(layer * H + h) * n_out + o]
        step2 = np.zeros(C)
        for c in range(C):
            acc = 0.0
            reach = 0.0
            for g in range(nk):
                i = (layer * nk + g) * C + c
                b = np.int64(kb[i])
                s = math.ldexp(mant[b & 15], int(e0[layer] + (b >> 4)))
                m = np.float64(_m12(km, i))
                n = np.float64(Tq - g * Gk if g == nk - 1 else Gk)
                acc = acc + (s * s) * n
                r = max(abs(m * s), abs((m + 255.0) * s))
                if r > reach:
                    reach = r
            step2[c] = acc
            peak[kidx[c]] = reach
        if D % 2 == 0:
            half = D // 2
            for h in range(H):
                for d in range(half):
                    p = max(peak[h * D + d], peak[h * D + d + half])
                    peak[h * D + d] = p
                    peak[h * D + d + half] = p
        gains = np.empty(nm * Dk)
        count = np.zeros(Dk, np.int64)
        for h in range(H):
            for k in range(nm):
                for c in range(Dk):
                    pk = peak[kidx[h * Dk + c]]
                    gains[k * Dk + c] = (step2[h * Dk + c] * (pk * pk)) * drop[k]
            order = np.arange(nm * Dk)
            take = budget - 2 * Dk
            _select(gains, order, take)
            count[:] = 0
            for t in range(take):
                count[order[t] % Dk] += 1
            for c in range(Dk):
                out[layer * C + h * Dk + c] = np.uint8(2 + count[c])
