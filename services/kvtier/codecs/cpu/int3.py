"""numba kernels for int3 on the CPU: int4a blob -> int3 blob, and int3 blob -> int8 blob, one
dispatch a page each way (the torch code in :mod:`kvtier.codecs.int3` is the reference and the
device path; :func:`kvtier.codecs.int3.self_test` and the tests hold both to the same bytes).

Arrays are flat uint8 blobs. Bit strings are little-endian: a code of ``w`` bits at bit ``p``
of a string sits in bits ``p % 8 ..`` of byte ``p // 8`` and the bytes after it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

from kvtier.codecs.cpu.int4a import TO_8, TO_B
from kvtier.codecs.cpu.rows import INLINE, JIT
from kvtier.codecs.layout import Layout

_OWN = ("kq", "vq", "kbits", "vbits")
# squared step of a b-bit code in int8 steps, and the drop of a move b -> b + 1 (b = 1..3)
_ERR = np.array([0.0] + [(255.0 / ((1 << b) - 1)) ** 2 for b in range(1, 9)])
V_DROP = np.array([_ERR[b] - _ERR[b + 1] for b in range(1, 4)])
# K: an int4a code of b bits -> the int3 code of b - 1 bits of the int8 code it stands for
K_MAP = np.zeros((9, 256), np.uint8)
for _b in range(2, 9):
    K_MAP[_b, :1 << _b] = TO_B[_b - 1][TO_8[_b][: 1 << _b]]
# V: an int4 code -> the code of w bits (w = 1..4) of the int8 code 17 q
V_MAP = np.zeros((5, 16), np.uint8)
for _w in range(1, 5):
    V_MAP[_w] = TO_B[_w][17 * np.arange(16)]
# two channels at once: a byte of int4 V codes -> their two w-bit codes as one 2w-bit field,
# and back, a 2w-bit field -> the two int8 codes (low byte first)
V_PAIR = np.zeros((5, 256), np.uint16)
V_UNPAIR = np.zeros((5, 256), np.uint16)
_byte = np.arange(256)
for _w in range(1, 5):
    V_PAIR[_w] = (V_MAP[_w][_byte & 15].astype(np.uint16)
                  | (V_MAP[_w][_byte >> 4].astype(np.uint16) << _w))
    _f = np.arange(1 << (2 * _w))
    _lo, _hi = _f & ((1 << _w) - 1), _f >> _w
    V_UNPAIR[_w, :_f.size] = TO_8[_w][_lo].astype(np.uint16) | (TO_8[_w][_hi].astype(np.uint16)
                                                                << 8)


def as_array(buf: bytearray) -> np.ndarray:
    return np.frombuffer(buf, dtype=np.uint8)


def _frozen(values: list[Any]) -> np.ndarray:
    a = np.array(values, dtype=np.int64)
    a.flags.writeable = False
    return a


def spans(src: Layout, dst: Layout) -> np.ndarray:
    """The sections both layouts hold but the codes and maps, as copy spans (source offset,
    destination offset, bytes), adjacent runs merged."""
    rows: list[list[int]] = []
    for name, off, n in dst.sections:
        if name in _OWN or not n:
            continue
        a = src.section(name)[0]
        if rows and rows[-1][0] + rows[-1][2] == a and rows[-1][1] + rows[-1][2] == off:
            rows[-1][2] += n
        else:
            rows.append([a, off, n])
    return _frozen(rows).reshape(len(rows), 3)


def plan(src: Layout, dst: Layout) -> tuple[Any, ...]:
    """The arguments after the two blobs of :func:`int3_from_int4a` (``src`` int4a, ``dst``
    int3) or :func:`int3_to_int8` (``src`` int3, ``dst`` int8)."""
    o, d = src.offsets, dst.offsets
    lay3 = dst if dst.value_bits else src
    geo = _frozen([lay3.L, lay3.Tq, lay3.H, lay3.Ck, lay3.HD, lay3.nv, lay3.Gv,
                   src.kq_row_bytes, dst.kq_row_bytes, lay3.vq_layer_bytes, lay3.v_budget,
                   src.key_bits])
    if dst.value_bits:  # int4a -> int3
        sec = _frozen([o[n][0] for n in ("exps", "vb", "kbits", "kq", "vq")] +
                      [d[n][0] for n in ("kbits", "vbits", "kq", "vq")])
        return spans(src, dst), sec, geo, V_DROP, K_MAP, V_MAP, V_PAIR
    sec = _frozen([o[n][0] for n in ("kbits", "vbits", "kq", "vq")] +
                  [d[n][0] for n in ("kq", "vq")])
    return spans(src, dst), sec, geo, TO_8, V_UNPAIR


@njit(**JIT)
def _copy_spans(src, dst, spans):  # type: ignore[no-untyped-def]
    for i in range(spans.shape[0]):
        a, b, n = spans[i, 0], spans[i, 1], spans[i, 2]
        dst[b:b + n] = src[a:a + n]


@njit(**INLINE)
def _rows4(layer, T, t0):  # type: ignore[no-untyped-def]
    """Four token rows of ``layer`` from ``t0`` (as row numbers); past the last token they
    repeat it (the kernels then write its bytes again, the same)."""
    base = layer * T
    return (base + t0, base + min(t0 + 1, T - 1), base + min(t0 + 2, T - 1),
            base + min(t0 + 3, T - 1))


@njit(**INLINE)
def _put(out, pos, acc, n):  # type: ignore[no-untyped-def]
    """Store the low ``n`` bytes of ``acc`` at ``out[pos:]``, little-endian."""
    for i in range(n):
        out[pos + i] = np.uint8((acc >> np.uint64(8 * i)) & np.uint64(0xFF))


@njit(**INLINE)
def _put4(out, pos, acc):  # type: ignore[no-untyped-def]
    """Store the low four bytes of ``acc`` at ``out[pos:]``, little-endian."""
    for i in range(4):
        out[pos + i] = np.uint8((acc >> np.uint64(8 * i)) & np.uint64(0xFF))


@njit(**JIT)
def _nibbles(src, pos, layer, C, out):  # type: ignore[no-untyped-def]
    """The ``C`` 4-bit fields of a layer's row of a nibble map (int4 packing) into ``out``."""
    cb = (C + 1) // 2
    for c in range(C):
        byte = np.int64(src[pos + layer * cb + (c >> 1)])
        out[c] = (byte & 0x0F) if c % 2 == 0 else (byte >> 4)


@njit(**JIT)
def _allocate_values(gains, n, budget, out):  # type: ignore[no-untyped-def]
    """Widths 1..4 of ``n`` groups from their moves' ``gains`` (``[3, n]`` flat, move b -> b+1
    of group g at ``(b - 1) n + g``): the ``budget - n`` moves a stable descending sort puts
    first, as :func:`kvtier.codecs.int3.allocate`. A group's gains fall bit by bit, so the
    moves taken are each group's first ones."""
    take = budget - n
    for g in range(n):
        out[g] = 1
    total = gains.size
    if take <= 0:
        return
    if take >= total:
        for g in range(n):
            out[g] = 4
        return
    tau = -np.partition(-gains, take - 1)[take - 1]  # the take-th largest gain
    above = 0
    for i in range(total):
        if gains[i] > tau:
            above += 1
    ties = take - above  # moves of gain tau taken: the earliest ones
    for i in range(total):
        gi = gains[i]
        if gi > tau or (gi == tau and ties > 0):
            if gi == tau:
                ties -= 1
            out[i % n] += 1


@njit(**JIT)
def int3_from_int4a(src, dst, spans, sec, geo, vdrop, kmap, vmap, vpair):  # type: ignore[no-untyped-def]
    """An int4a blob ``src`` -> the int3 blob ``dst`` (zeroed, header left to the caller).
    Returns True when the int4a key map is bad (widths outside 2..8 or a layer's sum off).
    ``sec``: blob offsets of exps, vb, kbits, kq, vq in ``src``, then kbits, vbits, kq, vq in
    ``dst``; ``geo``: L, T', H, C', HD, nv, Gv, K row bytes in and out, V bytes a layer, V
    budget, the int4a key bits a head."""
    _copy_spans(src, dst, spans)
    L, Tq, H, C, HD, nv, Gv = geo[0], geo[1], geo[2], geo[3], geo[4], geo[5], geo[6]
    rb4, rb3, vlb, vbud, kb4 = geo[7], geo[8], geo[9], geo[10], geo[11]
    if Tq == 0:
        return False
    b4 = np.empty(C, np.int64)
    cb = (C + 1) // 2
    n = Tq * nv
    gains = np.empty(3 * n)
    vw = np.empty(n, np.int64)
    glen = np.empty(nv)
    for g in range(nv):
        glen[g] = np.float64(min(Gv, HD - g * Gv))
    uniform = HD % Gv == 0  # every V group as long: equal weights
    for layer in range(L):
        _nibbles(src, sec[2], layer, C, b4)
        tot = 0
        for c in range(C):
            if b4[c] < 2 or b4[c] > 8:
                return True
            tot += b4[c]
        if tot != H * kb4:
            return True
        for j in range(cb):  # the int3 key map: one bit less a channel
            lo = b4[2 * j] - 1
            hi = b4[2 * j + 1] - 1 if 2 * j + 1 < C else 0
            dst[sec[5] + layer * cb + j] = np.uint8(lo | (hi << 4))
        for t0 in range(0, Tq, 4):  # K: four token rows at a time (they share the widths)
            r0, r1, r2, r3 = _rows4(layer, Tq, t0)
            i0, i1, i2, i3 = sec[3] + r0 * rb4, sec[3] + r1 * rb4, sec[3] + r2 * rb4, \
                sec[3] + r3 * rb4
            o0, o1, o2, o3 = sec[7] + r0 * rb3, sec[7] + r1 * rb3, sec[7] + r2 * rb3, \
                sec[7] + r3 * rb3
            a0 = a1 = a2 = a3 = np.uint64(0)
            x0 = x1 = x2 = x3 = np.uint64(0)
            nb = np.int64(0)
            onb = np.int64(0)
            j = 0
            k = 0
            for c in range(C):
                w = b4[c]
                if nb < w:  # w <= 8: four more bytes (or the row's last ones) cover it
                    for _ in range(4):
                        if j < rb4:
                            sh = np.uint64(nb)
                            a0 |= np.uint64(src[i0 + j]) << sh
                            a1 |= np.uint64(src[i1 + j]) << sh
                            a2 |= np.uint64(src[i2 + j]) << sh
                            a3 |= np.uint64(src[i3 + j]) << sh
                        j += 1
                        nb += 8
                mask = np.uint64((1 << w) - 1)
                sw = np.uint64(w)
                so = np.uint64(onb)
                x0 |= np.uint64(kmap[w, a0 & mask]) << so
                x1 |= np.uint64(kmap[w, a1 & mask]) << so
                x2 |= np.uint64(kmap[w, a2 & mask]) << so
                x3 |= np.uint64(kmap[w, a3 & mask]) << so
                a0 >>= sw
                a1 >>= sw
                a2 >>= sw
                a3 >>= sw
                nb -= w
                onb += w - 1
                if onb >= 32:
                    _put(dst, o0 + k, x0, 4)
                    _put(dst, o1 + k, x1, 4)
                    _put(dst, o2 + k, x2, 4)
                    _put(dst, o3 + k, x3, 4)
                    x0 >>= np.uint64(32)
                    x1 >>= np.uint64(32)
                    x2 >>= np.uint64(32)
                    x3 >>= np.uint64(32)
                    onb -= 32
                    k += 4
            rest = rb3 - k  # what is left of the rows
            _put(dst, o0 + k, x0, rest)
            _put(dst, o1 + k, x1, rest)
            _put(dst, o2 + k, x2, rest)
            _put(dst, o3 + k, x3, rest)
        # V: each group's weight (its channel count), its width by water-filling, the codes
        for i in range(n):
            w = glen[i % nv]
            for m in range(3):
                gains[m * n + i] = w * vdrop[m]
        if uniform and vbud % n == 0:  # equal weights, whole bits: the greedy's answer
            vw[:] = vbud // n
        else:
            _allocate_values(gains, n, vbud, vw)
        nvb = (n + 3) // 4
        for j in range(nvb):
            four = 0
            for e in range(4):
                if 4 * j + e < n:
                    four |= (vw[4 * j + e] - 1) << (2 * e)
            dst[sec[6] + layer * nvb + j] = np.uint8(four)
        op = sec[8] + layer * vlb
        oacc = np.uint64(0)
        onb = np.int64(0)
        k = 0
        rv = (HD + 1) // 2
        paired = Gv % 2 == 0 and HD % 2 == 0
        for t in range(Tq):
            ip = sec[4] + (layer * Tq + t) * rv
            for g in range(nv):  # a group's channels share a width
                w = vw[t * nv + g]
                c0, c1 = g * Gv, min(g * Gv + Gv, HD)
                if paired:  # the group's channels come in whole bytes: two at a time
                    w2 = 2 * w
                    for b in range(ip + (c0 >> 1), ip + (c1 >> 1)):
                        oacc |= np.uint64(vpair[w, src[b]]) << np.uint64(onb)
                        onb += w2
                        if onb >= 32:
                            _put4(dst, op + k, oacc)
                            oacc >>= np.uint64(32)
                            k += 4
                            onb -= 32
                    continue
                for ch in range(c0, c1):
                    q4 = (np.int64(src[ip + (ch >> 1)]) >> ((ch & 1) << 2)) & 15
                    oacc |= np.uint64(vmap[w, q4]) << np.uint64(onb)
                    onb += w
                    if onb >= 32:
                        _put4(dst, op + k, oacc)
                        oacc >>= np.uint64(32)
                        k += 4
                        onb -= 32
        while onb > 0:
            dst[op + k] = np.uint8(oacc & np.uint64(0xFF))
            oacc >>= np.uint64(8)
            k += 1
            onb -= 8
    return False


@njit(**JIT)
def int3_to_int8(src, dst, spans, sec, geo, to_8, unpair):  # type: ignore[no-untyped-def]
    """An int3 blob ``src`` -> the int8 blob ``dst`` (zeroed, header left to the caller) that
    decodes to the same page. Returns 0, or 1 on a bad key map, 2 on a bad value map. ``sec``:
    offsets of kbits, vbits, kq, vq in ``src``, then kq, vq in ``dst``; ``geo`` as in
    :func:`int3_from_int4a` (``key_bits`` the int3 one)."""
    _copy_spans(src, dst, spans)
    L, Tq, H, C, HD, nv, Gv = geo[0], geo[1], geo[2], geo[3], geo[4], geo[5], geo[6]
    rb3, vlb, vbud, kb3 = geo[7], geo[9], geo[10], geo[11]
    if Tq == 0:
        return 0
    kb = np.empty(C, np.int64)
    n = Tq * nv
    vw = np.empty(n, np.int64)
    nvb = (n + 3) // 4
    for layer in range(L):
        _nibbles(src, sec[0], layer, C, kb)
        tot = 0
        for c in range(C):
            if kb[c] < 1 or kb[c] > 8:
                return 1
            tot += kb[c]
        if tot != H * kb3:
            return 1
        tot = 0
        for i in range(n):
            vw[i] = ((np.int64(src[sec[1] + layer * nvb + (i >> 2)]) >> (2 * (i & 3))) & 3) + 1
            tot += vw[i]
        if tot != vbud:
            return 2
        for t0 in range(0, Tq, 4):  # K: four token rows at a time (they share the widths)
            r0, r1, r2, r3 = _rows4(layer, Tq, t0)
            i0, i1, i2, i3 = sec[2] + r0 * rb3, sec[2] + r1 * rb3, sec[2] + r2 * rb3, \
                sec[2] + r3 * rb3
            o0, o1, o2, o3 = sec[4] + r0 * C, sec[4] + r1 * C, sec[4] + r2 * C, sec[4] + r3 * C
            a0 = a1 = a2 = a3 = np.uint64(0)
            nb = np.int64(0)
            j = 0
            for c in range(C):
                w = kb[c]
                if nb < w:
                    for _ in range(4):
                        if j < rb3:
                            sh = np.uint64(nb)
                            a0 |= np.uint64(src[i0 + j]) << sh
                            a1 |= np.uint64(src[i1 + j]) << sh
                            a2 |= np.uint64(src[i2 + j]) << sh
                            a3 |= np.uint64(src[i3 + j]) << sh
                        j += 1
                        nb += 8
                mask = np.uint64((1 << w) - 1)
                sw = np.uint64(w)
                dst[o0 + c] = to_8[w, a0 & mask]
                dst[o1 + c] = to_8[w, a1 & mask]
                dst[o2 + c] = to_8[w, a2 & mask]
                dst[o3 + c] = to_8[w, a3 & mask]
                a0 >>= sw
                a1 >>= sw
                a2 >>= sw
                a3 >>= sw
                nb -= w
        ip = sec[3] + layer * vlb
        paired = Gv % 2 == 0 and HD % 2 == 0
        acc = np.uint64(0)
        nb = np.int64(0)
        j = 0
        for t in range(Tq):
            op = sec[5] + (layer * Tq + t) * HD
            for g in range(nv):  # a group's channels share a width
                w = vw[t * nv + g]
                c0, c1 = g * Gv, min(g * Gv + Gv, HD)
                if paired:  # two channels at once
                    sw2 = np.uint64(2 * w)
                    mask2 = np.uint64((1 << (2 * w)) - 1)
                    for ch in range(c0, c1, 2):
                        if nb < 2 * w:
                            for _ in range(4):
                                if j < vlb:
                                    acc |= np.uint64(src[ip + j]) << np.uint64(nb)
                                j += 1
                                nb += 8
                        two = unpair[w, acc & mask2]
                        dst[op + ch] = np.uint8(two & 0xFF)
                        dst[op + ch + 1] = np.uint8(two >> 8)
                        acc >>= sw2
                        nb -= 2 * w
                    continue
                sw = np.uint64(w)
                mask = np.uint64((1 << w) - 1)
                for ch in range(c0, c1):
                    if nb < w:
                        for _ in range(4):
                            if j < vlb:
                                acc |= np.uint64(src[ip + j]) << np.uint64(nb)
                            j += 1
                            nb += 8
                    dst[op + ch] = to_8[w, acc & mask]
                    acc >>= sw
                    nb -= w
    return 0
