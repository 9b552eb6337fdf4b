"""numba kernels for int4a on the CPU: the key bit allocation and the code maps (the torch code
in :mod:`kvtier.codecs.int4a` is the reference and the device path; the tests and
:func:`kvtier.codecs.int4a.self_test` hold both to the same bytes).

Arrays are flat uint8. ``bits`` is ``[L, C']``; K codes are ``[L, T', C']`` int8 codes on one
side and rows of ``rb`` bytes on the other (channel ``c``'s code at bit ``sum(bits[:c])`` of its
token's row, little-endian).

Encoding runs the int8 encoder, then :func:`int4a_from_int8` (allocation, K rows, V nibbles);
decoding is one kernel, :func:`decode_page`, straight from the int4a blob into the page. On a
CPU with fast BMI2 the K rows are packed with ``pext`` and read with ``pdep``, seven codes at a
time, and the code maps run as float32 loops that vectorize (exact, see ``_R510``); elsewhere
byte-at-a-time loops that give the same bytes (both are tested against each other).
"""

from __future__ import annotations


import numpy as np
from numba import njit

from kvtier.codecs.cpu.int8_int4 import _copy_sinks, _runs, decode_v, int8_to_int4_rows
from kvtier.codecs.cpu.intrinsics import (
    bits_to_f32, f16_to_f32, f64_to_bits, load_u64, pdep, pext, store_u64,
)
from kvtier.codecs.cpu.rows import (
    INLINE, JIT, copy, dequant_store, get_m12, prefetch_share, share_size, table,
)


def _tables() -> tuple[np.ndarray, np.ndarray]:
    """``TO_B[b, q8]``: the ``b``-bit code of an int8 code; ``TO_8[b, q]``: the int8 code of a
    ``b``-bit code (the integer maps of :mod:`kvtier.codecs.int4a`, as lookup tables)."""
    to_b = np.zeros((9, 256), np.uint8)
    to_8 = np.zeros((9, 256), np.uint8)
    q = np.arange(256, dtype=np.int64)
    for b in range(1, 9):
        lv = (1 << b) - 1
        to_b[b] = (2 * q * lv + 255) // 510
        to_8[b, :lv + 1] = (510 * q[:lv + 1] + lv) // (2 * lv)
    return to_b, to_8


TO_B, TO_8 = _tables()
TO_8_FLAT = TO_8.reshape(-1).copy()  # [w * 256 + q]: one index a code
TO_8_FLAT.flags.writeable = False
TO_B_FLAT = TO_B.reshape(-1).copy()
TO_B_FLAT.flags.writeable = False
# The code maps in float32, for loops that vectorize: ``floor((2 q8 lv + 255) / 510)`` and
# ``floor((510 q + lv) / (2 lv))`` (lv = 2^b - 1). Both numerators are odd integers below
# 2^24 (exact in float32) over even denominators, so the quotient is never within 1/510 of an
# integer, while multiplying by the rounded reciprocal errs by less than 2^-22 of it (< 1e-4
# for quotients below 256): the truncation is the integer floor. The tests check every
# (width, code) against the tables.
_R510 = np.float32(1.0 / 510.0)


_U8 = np.uint64(0xFF)


@njit(**INLINE)
def _put(out, pos, acc, n):  # type: ignore[no-untyped-def]
    """Store the low ``n`` bytes of ``acc`` at ``out[pos:]``, little-endian."""
    for i in range(n):
        out[pos + i] = np.uint8((acc >> np.uint64(8 * i)) & _U8)


@njit(**INLINE)
def _rows4(L, T, layer, t0, step):  # type: ignore[no-untyped-def]
    """The starts (in units of ``step``) of four token rows of ``layer`` from ``t0``; past the
    last token they repeat it (the kernels then write its bytes twice, the same)."""
    r0 = (layer * T + t0) * step
    r1 = (layer * T + min(t0 + 1, T - 1)) * step
    r2 = (layer * T + min(t0 + 2, T - 1)) * step
    r3 = (layer * T + min(t0 + 3, T - 1)) * step
    return r0, r1, r2, r3


@njit(**INLINE)
def _groups(bits, first, C, gmask, gwidth):  # type: ignore[no-untyped-def]
    """The K channels ``bits[first:first + C]`` in groups of seven (at most 56 bits): each
    group's ``pdep``/``pext`` mask (the group's channel ``i`` in byte ``i``, as many low bits
    as its width) and its width in bits."""
    for g in range((C + 6) // 7):
        m = np.uint64(0)
        total = np.uint64(0)
        for i in range(min(7, C - 7 * g)):
            w = np.uint64(bits[first + 7 * g + i])
            m |= ((np.uint64(1) << w) - np.uint64(1)) << np.uint64(8 * i)
            total += w
        gmask[g] = m
        gwidth[g] = total


@njit(**JIT)
def pack_keys_bmi2(q8, L, T, C, bits, rb, out, to_b):  # type: ignore[no-untyped-def]
    """:func:`pack_keys` with ``pext``: a row's int8 codes mapped to their widths' codes,
    then seven channels at a time gathered into their bits and appended to the row (a
    branch-free bit writer: an 8-byte store, then the whole bytes written are dropped)."""
    ng = (C + 6) // 7
    gmask = np.empty(ng, np.uint64)
    gwidth = np.empty(ng, np.uint64)
    lv2 = np.empty(C, np.float32)
    qb = np.zeros(7 * ng + 8, np.uint8)  # the row's codes, with slack for 8-byte loads
    row = np.zeros(rb + 16, np.uint8)
    seven = np.uint64(7)
    three = np.uint64(3)
    for layer in range(L):
        _groups(bits, layer * C, C, gmask, gwidth)
        for c in range(C):
            lv2[c] = np.float32(2 * ((1 << np.int64(bits[layer * C + c])) - 1))
        for t in range(T):
            src = q8[(layer * T + t) * C:(layer * T + t + 1) * C]
            for c in range(C):  # round(q8 lv / 255) = floor((2 q8 lv + 255) / 510), see _B_OF
                qb[c] = np.uint8(np.int32((np.float32(src[c]) * lv2[c] + np.float32(255.0))
                                          * _R510))
            acc = np.uint64(0)
            nb = np.uint64(0)
            j = np.int64(0)
            for g in range(ng):
                acc |= pext(load_u64(qb, 7 * g), gmask[g]) << nb
                nb += gwidth[g]
                store_u64(row, j, acc)
                adv = nb >> three
                j += np.int64(adv)
                acc >>= adv << three
                nb &= seven
            copy(out[(layer * T + t) * rb:(layer * T + t + 1) * rb], row[:rb])


@njit(**JIT)
def pack_keys(q8, L, T, C, bits, rb, out, to_b):  # type: ignore[no-untyped-def]
    """int8 K codes -> rows of ``bits``-wide codes ``round(q8 (2^b - 1) / 255)`` (every byte
    of ``out`` written). Four token rows at a time (they share the bit widths), each row's bits
    gathered in a 64-bit word and stored 4 bytes at a time."""
    width = np.empty(C, np.int64)
    for layer in range(L):
        for c in range(C):
            width[c] = np.int64(bits[layer * C + c])
        for t0 in range(0, T, 4):
            s0, s1, s2, s3 = _rows4(L, T, layer, t0, C)
            p0, p1, p2, p3 = _rows4(L, T, layer, t0, rb)
            a0 = a1 = a2 = a3 = np.uint64(0)
            nb = np.int64(0)
            j = 0
            for c in range(C):
                w = width[c]
                sh = np.uint64(nb)
                a0 |= np.uint64(to_b[w, q8[s0 + c]]) << sh
                a1 |= np.uint64(to_b[w, q8[s1 + c]]) << sh
                a2 |= np.uint64(to_b[w, q8[s2 + c]]) << sh
                a3 |= np.uint64(to_b[w, q8[s3 + c]]) << sh
                nb += w
                if nb >= 32:
                    _put(out, p0 + j, a0, 4)
                    _put(out, p1 + j, a1, 4)
                    _put(out, p2 + j, a2, 4)
                    _put(out, p3 + j, a3, 4)
                    a0 >>= np.uint64(32)
                    a1 >>= np.uint64(32)
                    a2 >>= np.uint64(32)
                    a3 >>= np.uint64(32)
                    nb -= 32
                    j += 4
            n = rb - j  # < 8: what is left of the row, zero bits past the codes
            _put(out, p0 + j, a0, n)
            _put(out, p1 + j, a1, n)
            _put(out, p2 + j, a2, n)
            _put(out, p3 + j, a3, n)


@njit(**JIT)
def unpack_keys(rows, L, T, C, bits, rb, out, to_8):  # type: ignore[no-untyped-def]
    """Rows of ``bits``-wide K codes -> the int8 codes they stand for,
    ``round(q 255 / (2^b - 1))``. Four token rows at a time, each read 4 bytes at a time into
    a 64-bit word."""
    width = np.empty(C, np.int64)
    for layer in range(L):
        for c in range(C):
            width[c] = np.int64(bits[layer * C + c])
        for t0 in range(0, T, 4):
            d0, d1, d2, d3 = _rows4(L, T, layer, t0, C)
            p0, p1, p2, p3 = _rows4(L, T, layer, t0, rb)
            a0 = a1 = a2 = a3 = np.uint64(0)
            nb = np.int64(0)
            j = 0
            for c in range(C):
                w = width[c]
                if nb < w:  # w <= 8, so 4 more bytes (or the row's last ones) cover it
                    for _ in range(4):
                        if j < rb:
                            sh = np.uint64(nb)
                            a0 |= np.uint64(rows[p0 + j]) << sh
                            a1 |= np.uint64(rows[p1 + j]) << sh
                            a2 |= np.uint64(rows[p2 + j]) << sh
                            a3 |= np.uint64(rows[p3 + j]) << sh
                            j += 1
                        nb += 8
                mask = (np.uint64(1) << np.uint64(w)) - np.uint64(1)
                out[d0 + c] = to_8[w, a0 & mask]
                out[d1 + c] = to_8[w, a1 & mask]
                out[d2 + c] = to_8[w, a2 & mask]
                out[d3 + c] = to_8[w, a3 & mask]
                sw = np.uint64(w)
                a0 >>= sw
                a1 >>= sw
                a2 >>= sw
                a3 >>= sw
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
def kth_largest(keys, n, k, hist):  # type: ignore[no-untyped-def]
    """The ``k``-th largest (1-based, ``1 <= k <= n``) of ``keys[:n]`` (uint64), which it
    reorders: a radix select a byte at a time, from the highest byte in which the keys differ
    (each pass keeps the keys that share the answer's bytes so far at the front)."""
    lo = keys[0]
    hi = keys[0]
    for i in range(n):
        lo = min(lo, keys[i])
        hi = max(hi, keys[i])
    diff = lo ^ hi
    top = 0
    while top < 8 and (diff >> np.uint64(8 * top)) != np.uint64(0):
        top += 1
    m = n
    for d in range(top - 1, -1, -1):
        sh = np.uint64(8 * d)
        hist[:] = 0
        for i in range(m):
            hist[(keys[i] >> sh) & np.uint64(255)] += 1
        b = 255
        while k > hist[b]:
            k -= hist[b]
            b -= 1
        j = 0
        for i in range(m):
            x = keys[i]
            if (x >> sh) & np.uint64(255) == np.uint64(b):
                keys[j] = x
                j += 1
        m = j
        if m == 1:
            break
    return keys[0]


@njit(**JIT)
def take_first(gains, order, m, k, keys, hist, taken):  # type: ignore[no-untyped-def]
    """Set ``taken[i]`` (0/1, for ``i < m``) for the moves ``order[:m]`` (ascending) that a
    stable descending sort of ``gains`` puts among its first ``k`` (all of which are in
    ``order[:m]``): the ``k``-th largest gain by :func:`kth_largest` on the gains' bits
    (non-negative doubles order as their bits do), then every larger move and, of the moves
    equal to it, the earliest ones (the stable sort's tie order)."""
    for i in range(m):
        taken[i] = 0
    if k <= 0:
        return
    for i in range(m):
        keys[i] = f64_to_bits(gains[order[i]])
    g = kth_largest(keys, m, k, hist)
    above = 0
    for i in range(m):
        above += f64_to_bits(gains[order[i]]) > g
    need = k - above
    for i in range(m):
        x = f64_to_bits(gains[order[i]])
        if x > g:
            taken[i] = 1
        elif x == g and need > 0:
            taken[i] = 1
            need -= 1


@njit(**JIT)
def _candidates(gains, n, k, order):  # type: ignore[no-untyped-def]
    """Put in ``order`` the moves that can be among the first ``k`` (of ``n`` channels' moves,
    listed bit by bit), and return how many: those up to the last move of the first
    ``ceil(k / n)`` bits. Every channel's moves come in bit order (its gains fall), so that last
    move has ``ceil(k / n) n >= k`` moves up to it. On pages whose channel weights are close,
    that leaves few more than ``k``."""
    total = gains.size
    if k <= 0 or k >= total:
        for i in range(total):
            order[i] = i
        return total
    base = (k + n - 1) // n * n - n
    y = base
    for i in range(base + 1, base + n):
        if _before(gains, y, i):
            y = i
    m = 0
    gy = gains[y]
    for i in range(total):  # branch-free: i is written anyway, m moves past it or not
        gi = gains[i]
        order[m] = i
        m += (gi > gy) | ((gi == gy) & (i <= y))
    return m


@njit(**JIT)
def allocate_keys(  # type: ignore[no-untyped-def]
        kb, km, e0, mant, L, nk, Gk, Tq, H, D, n_out, oidx, opeak, drop, budget, out):
    """Bits of every quantized K channel (``out`` ``[L, C']``), the same numbers as
    :func:`kvtier.codecs.int4a.key_weights` then :func:`~kvtier.codecs.int4a.allocate` (same
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
        # the layer's scales by code (ldexp(mant[b & 15], e0 + (b >> 4)), exactly: doubling)
        tab = table(np.int64(e0[layer]), mant)
        step2 = np.zeros(C)
        for c in range(C):
            acc = 0.0
            reach = 0.0
            for g in range(nk):
                i = (layer * nk + g) * C + c
                s = tab[kb[i]]
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
        w = np.empty(Dk)
        order = np.empty(nm * Dk, np.int64)
        keys = np.empty(nm * Dk, np.uint64)
        taken = np.empty(nm * Dk, np.int64)
        hist = np.empty(256, np.int64)
        chan = np.empty(nm * Dk, np.int64)  # a move's channel, without a division a move
        for k in range(nm):
            for c in range(Dk):
                chan[k * Dk + c] = c
        for h in range(H):
            for c in range(Dk):
                pk = peak[kidx[h * Dk + c]]
                w[c] = step2[h * Dk + c] * (pk * pk)
            for k in range(nm):
                for c in range(Dk):
                    gains[k * Dk + c] = w[c] * drop[k]
            take = budget - 2 * Dk
            m = _candidates(gains, Dk, take, order)
            take_first(gains, order, m, take, keys, hist, taken)
            count[:] = 0
            for i in range(m):
                count[chan[order[i]]] += taken[i]
            for c in range(Dk):
                out[layer * C + h * Dk + c] = np.uint8(2 + count[c])


# --- whole payloads: one dispatch per page (numba's argument checks cost microseconds each) ---

@njit(**INLINE)
def _i16(src, pos):  # type: ignore[no-untyped-def]
    """The little-endian int16 at ``src[pos:pos + 2]``."""
    u = np.int64(src[pos]) | (np.int64(src[pos + 1]) << 8)
    return u - 65536 if u >= 32768 else u


@njit(**INLINE)
def _raw(src, pos, kind):  # type: ignore[no-untyped-def]
    """The float64 value of the page-dtype element at byte ``pos`` (kind: ``DType.code``)."""
    if kind == 0:
        return np.float64(f16_to_f32(np.uint16(src[pos]) | (np.uint16(src[pos + 1]) << 8)))
    if kind == 1:
        return np.float64(bits_to_f32((np.uint32(src[pos]) | (np.uint32(src[pos + 1]) << 8))
                                      << np.uint32(16)))
    u = np.uint32(0)
    for i in range(4):
        u |= np.uint32(src[pos + i]) << np.uint32(8 * i)
    return np.float64(bits_to_f32(u))


@njit(**JIT)
def int4a_from_int8(src, dst, spans, sec, geo, mant, drop, to_b, fast=False):  # type: ignore[no-untyped-def]  # noqa: E501
    """An int8 blob ``src`` -> the int4a blob ``dst`` (zeroed, header left to the caller): the
    grid sections copied (``spans`` rows: source offset, destination offset, bytes), the key bits
    allocated (:func:`allocate_keys`), the map and the codes written. ``sec``: blob offsets of
    exps, oidx, oraw, kb, km, kq and vq in ``src``, then kbits, kq and vq in ``dst``; ``geo``:
    L, T', H, D, outliers, K groups, K group size, dtype kind, head budget, K row bytes;
    ``fast``: pack with :func:`pack_keys_bmi2` (the same bytes)."""
    for i in range(spans.shape[0]):
        a, b, n = spans[i, 0], spans[i, 1], spans[i, 2]
        copy(dst[b:b + n], src[a:a + n])
    L, Tq, H, D, n_out, nk, Gk, kind, budget, rb = geo[0], geo[1], geo[2], geo[3], geo[4], \
        geo[5], geo[6], geo[7], geo[8], geo[9]
    if Tq == 0:
        return
    C = H * (D - n_out)
    e0 = np.empty(L, np.int64)
    for layer in range(L):
        e0[layer] = _i16(src, sec[0] + 4 * layer)
    no = L * H * n_out
    oidx = np.empty(no, np.int64)
    opeak = np.zeros(no)
    esize = 2 if kind < 2 else 4
    for i in range(no):
        oidx[i] = _i16(src, sec[1] + 2 * i)
    for layer in range(L):  # |raw outlier values|, max over tokens (NaN wins, as torch's amax)
        for t in range(Tq):
            for j in range(H * n_out):
                i = layer * H * n_out + j
                x = abs(_raw(src, sec[2] + esize * ((layer * Tq + t) * H * n_out + j), kind))
                if x > opeak[i] or x != x:
                    if opeak[i] == opeak[i]:
                        opeak[i] = x
    bits = np.empty(L * C, np.uint8)
    allocate_keys(src[sec[3]:sec[3] + L * nk * C], src[sec[4]:], e0, mant, L, nk, Gk, Tq, H, D,
                  n_out, oidx, opeak, drop, budget, bits)
    cb = (C + 1) // 2
    for layer in range(L):
        for j in range(cb):
            lo = bits[layer * C + 2 * j]
            hi = bits[layer * C + 2 * j + 1] if 2 * j + 1 < C else np.uint8(0)
            dst[sec[7] + layer * cb + j] = lo | (hi << np.uint8(4))
    if fast:
        pack_keys_bmi2(src[sec[5]:sec[5] + L * Tq * C], L, Tq, C, bits, rb,
                       dst[sec[8]:sec[8] + L * Tq * rb], to_b)
    else:
        pack_keys(src[sec[5]:sec[5] + L * Tq * C], L, Tq, C, bits, rb,
                  dst[sec[8]:sec[8] + L * Tq * rb], to_b)
    HD = H * D
    int8_to_int4_rows(src[sec[6]:sec[6] + L * Tq * HD], L * Tq, HD,
                      dst[sec[9]:sec[9] + L * Tq * ((HD + 1) // 2)])


@njit(**JIT)
def int4a_to_int8(src, dst, spans, sec, geo, to_8):  # type: ignore[no-untyped-def]
    """An int4a blob ``src`` -> the int8 blob ``dst`` that decodes to the same page (zeroed,
    header left to the caller). ``sec``: blob offsets of kbits, kq and vq in ``src``, then kq
    and vq in ``dst``; ``geo``: L, T', H, D, outliers, key bits a head, K row bytes. Returns 1
    (and writes no codes) when the bit map holds a width outside 2..8 or a layer's widths do
    not sum to ``H`` times the key bits, else 0."""
    for i in range(spans.shape[0]):
        a, b, n = spans[i, 0], spans[i, 1], spans[i, 2]
        copy(dst[b:b + n], src[a:a + n])
    L, Tq, H, D, n_out, kb, rb = geo[0], geo[1], geo[2], geo[3], geo[4], geo[5], geo[6]
    if Tq == 0:
        return 0
    C = H * (D - n_out)
    cb = (C + 1) // 2
    bits = np.empty(L * C, np.uint8)
    bad = False
    for layer in range(L):
        total = np.int64(0)
        for c in range(C):
            byte = src[sec[0] + layer * cb + c // 2]
            b = byte & np.uint8(0x0F) if c % 2 == 0 else byte >> np.uint8(4)
            bad |= b < 2 or b > 8
            bits[layer * C + c] = b
            total += np.int64(b)
        bad |= total != H * kb
    if bad:
        return 1
    unpack_keys(src[sec[1]:sec[1] + L * Tq * rb], L, Tq, C, bits, rb,
                dst[sec[3]:sec[3] + L * Tq * C], to_8)
    HD = H * D
    int4_rows_to_int8(src[sec[2]:sec[2] + L * Tq * ((HD + 1) // 2)], L * Tq, HD,
                      dst[sec[4]:sec[4] + L * Tq * HD])
    return 0


# --- whole pages, fused: an int4a blob decoded straight into the page ---

@njit(**JIT)
def read_bit_map(src, L, C, kb):  # type: ignore[no-untyped-def]
    """The K bit map ``[L, C']`` of an int4a blob's ``kbits`` section ``src``, or an empty
    array when a width is outside 2..8 or a layer's widths do not sum to ``kb``."""
    cb = (C + 1) // 2
    bits = np.empty(L * C, np.uint8)
    bad = False
    for layer in range(L):
        total = np.int64(0)
        for c in range(C):
            byte = src[layer * cb + c // 2]
            b = byte & np.uint8(0x0F) if c % 2 == 0 else byte >> np.uint8(4)
            bad |= b < 2 or b > 8
            bits[layer * C + c] = b
            total += np.int64(b)
        bad |= total != kb
    if bad:
        return bits[:0]
    return bits


@njit(**INLINE)
def _row_plan(bits, first, C, byte, shift, base, mask):  # type: ignore[no-untyped-def]
    """Each K channel's byte and bit shift in a token row, its lookup base (``w * 256``) in
    the flat ``TO_8`` table and its code mask, for the widths ``bits[first:first + C]``.
    Unsigned: numba then skips its negative-index handling in the loops that use them."""
    off = np.uint64(0)
    for c in range(C):
        wc = np.uint64(bits[first + c])
        byte[c] = off >> np.uint64(3)
        shift[c] = off & np.uint64(7)
        base[c] = wc * np.uint64(256)
        mask[c] = (np.uint64(1) << wc) - np.uint64(1)
        off += wc


@njit(**JIT)
def decode_keys(kb, km, kq, oidx_in, oraw, exps, bits, kind, L, T, S, H, D,  # type: ignore[no-untyped-def]
                n_out, Gk, rb, mant, to_8, out, nxt, fast):
    """K of an int4a blob into ``out``: each token row's codes mapped to the int8 codes they
    stand for (``TO_8``) and dequantized as the int8 decoder does, in one pass (the same
    arithmetic, so the same values as decoding the expanded int8 blob). ``fast`` (a host with
    quick BMI2): seven codes at a time spread into bytes with ``pdep`` (a branch-free bit
    reader), then mapped in a loop that vectorizes; else every channel's code is read from its
    own byte pair, so the row's channels do not wait on each other."""
    HD = H * D
    Tq = T - S
    Ck = H * (D - n_out)
    nk = (Tq + Gk - 1) // Gk
    w = 2 if kind == 2 else 1
    ng = nk * Ck
    step = np.float32(1)
    m_l = np.empty(ng, np.int32)
    s_k = np.empty(ng, np.float32)
    m_k = np.empty(ng, np.float32)
    qk = np.empty(Ck, np.uint8)
    byte = np.empty(Ck, np.uint64)
    shift = np.empty(Ck, np.uint64)
    base = np.empty(Ck, np.uint64)
    mask = np.empty(Ck, np.uint64)
    row = np.zeros(rb + 16, np.uint8)  # a row with zero bytes past its end
    one = np.uint64(1)
    eight = np.uint64(8)
    n7 = (Ck + 6) // 7  # groups of seven channels
    gmask = np.empty(n7, np.uint64)
    gwidth = np.empty(n7, np.uint64)
    codes = np.zeros(7 * n7 + 8, np.uint8)
    lvf = np.empty(Ck, np.float32)
    rinv = np.empty(Ck, np.float32)
    per = share_size(nxt.size, L * Tq, 1)
    for layer in range(L):
        tab = table(np.int64(exps[2 * layer]), mant)
        get_m12(km, layer * ng, m_l)
        for i in range(ng):
            s_k[i] = np.float32(tab[kb[layer * ng + i]])
            m_k[i] = np.float32(m_l[i])
        _row_plan(bits, layer * Ck, Ck, byte, shift, base, mask)
        if fast:
            _groups(bits, layer * Ck, Ck, gmask, gwidth)
            for c in range(Ck):
                lv = (1 << np.int64(bits[layer * Ck + c])) - 1
                lvf[c] = np.float32(lv)
                rinv[c] = np.float32(1.0 / (2 * lv))
        taken = np.zeros(HD, np.bool_)
        for h in range(H):
            for j in range(n_out):
                taken[h * D + oidx_in[(layer * H + h) * n_out + j]] = True
        rf, rk, rl = _runs(taken, H, D)
        for t in range(Tq):
            prefetch_share(nxt, 0, nxt.size, layer * Tq + t, per)
            o = (layer * Tq + t) * rb
            copy(row, kq[o:o + rb])
            if fast:
                pos = np.uint64(0)
                for g in range(n7):
                    x = load_u64(row, np.int64(pos >> np.uint64(3))) >> (pos & np.uint64(7))
                    store_u64(codes, 7 * g, pdep(x, gmask[g]))
                    pos += gwidth[g]
                for c in range(Ck):  # round(q 255 / lv) = floor((510 q + lv) / (2 lv))
                    qk[c] = np.uint8(np.int32((np.float32(codes[c]) * np.float32(510.0)
                                               + lvf[c]) * rinv[c]))
            else:
                for c in range(Ck):
                    b = byte[c]
                    word = np.uint64(row[b]) | (np.uint64(row[b + one]) << eight)
                    qk[c] = to_8[base[c] + ((word >> shift[c]) & mask[c])]
            g0 = (t // Gk) * Ck
            do = (layer * T + S + t) * HD
            for r in range(rf.size):
                a, n = rk[r], rl[r]
                dequant_store(qk[a:a + n], m_k[g0 + a:g0 + a + n], s_k[g0 + a:g0 + a + n],
                              step, kind, out[(do + rf[r]) * w:(do + rf[r] + n) * w])
            for h in range(H):
                for j in range(n_out):
                    c = h * D + oidx_in[(layer * H + h) * n_out + j]
                    so = ((layer * Tq + t) * H * n_out + h * n_out + j) * w
                    for i in range(w):
                        out[(do + c) * w + i] = oraw[so + i]


@njit(**JIT)
def decode_page(blob, sec, geo, mant, to_8, out, fast):  # type: ignore[no-untyped-def]
    """Decode an int4a blob into ``out`` (the words of K then V) without the int8 blob in
    between. ``sec``: section bounds in ``layout.QUANTIZED_SECTIONS`` order, then kbits';
    ``geo``: (kind, L, T, S, H, D, n_out, Gk, Gv, key bits a head, K row bytes). V's codes
    are int4 on the int8 grid, so the int4 decoder's V (``17 q4``) is the int8 one's.

    Returns 0, or before touching ``out``: 1 for outlier indices out of range or not
    ascending, 2 for scale exponents out of range, 3 for a bad key bit map. ``fast``: see
    :func:`decode_keys` (the same values either way)."""
    kind, L, T, S, H, D, n_out, Gk, Gv, kbh, rb = (geo[0], geo[1], geo[2], geo[3], geo[4],
                                                    geo[5], geo[6], geo[7], geo[8], geo[9],
                                                    geo[10])
    oidx = blob[sec[0]:sec[1]].view(np.int16)
    exps = blob[sec[2]:sec[3]].view(np.int16)
    C = H * (D - n_out)
    bits = np.empty(0, np.uint8)
    if T > S:
        for i in range(oidx.size):
            if oidx[i] < 0 or oidx[i] >= D or (i % n_out > 0 and oidx[i] <= oidx[i - 1]):
                return 1
        for i in range(exps.size):
            if exps[i] < -126 or exps[i] > 111:  # grid.E0_MIN, grid.E0_MAX
                return 2
        bits = read_bit_map(blob[sec[20]:sec[21]], L, C, H * kbh)
        if bits.size != L * C:
            return 3
    row = H * D * (2 if kind == 2 else 1)
    ok = out[:out.size // 2]
    ov = out[out.size // 2:]
    sink = blob[sec[4]:sec[5]].view(np.uint16)
    half = sink.size // 2
    _copy_sinks(sink[:half], ok, L, T, S, row, False)
    _copy_sinks(sink[half:], ov, L, T, S, row, False)
    if T == S:
        return 0
    decode_keys(blob[sec[8]:sec[9]], blob[sec[10]:sec[11]], blob[sec[16]:sec[17]], oidx,
                blob[sec[6]:sec[7]].view(np.uint16), exps, bits, kind, L, T, S, H, D, n_out,
                Gk, rb, mant, to_8, ok, blob[sec[12]:sec[19]], fast)
    decode_v(blob[sec[12]:sec[13]], blob[sec[14]:sec[15]], blob[sec[18]:sec[19]], exps, kind,
             L, T, S, H * D, Gv, 4, mant, ov)
    return 0
