"""Layer kernels (numba): encode and decode K and V of a page, one layer at a time.

A layer is read once from the page, converted to float32 into a scratch block that stays in
cache, and every later step (outlier selection, group bounds, grid, codes) reads the scratch.
K groups run over tokens per channel, so the kernels keep per-channel grid rows and work on
whole token rows (contiguous, vectorized); the outlier channels are skipped by working run
by run over the kept channels between them.

Arrays are flat; page tensors are uint16 word arrays (a float32 element is two words), so
``w`` words make one element. See :mod:`kvtier.codecs.blob` for the sections written here.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from kvtier.codecs.cpu.rows import (
    JIT, bounds_row, choose, copy, dequant_store, dequant_store_group, get_codes, get_m12,
    group_bounds, load_row, prefetch_share, put_codes, put_m12, quantize_flat, quantize_row,
    share_size, table,
)


@njit(**JIT)
def _runs(taken, H, D):  # type: ignore[no-untyped-def]
    """Runs of kept (not outlier) channels: (start in the full row, start in the kept row,
    length), in order."""
    full = np.empty(H * D, np.int64)
    kept = np.empty(H * D, np.int64)
    length = np.empty(H * D, np.int64)
    n = 0
    k = 0
    c = 0
    while c < H * D:
        if taken[c]:
            c += 1
            continue
        start = c
        while c < H * D and not taken[c]:
            c += 1
        full[n] = start
        kept[n] = k
        length[n] = c - start
        k += c - start
        n += 1
    return full[:n], kept[:n], length[:n]


@njit(**JIT)
def encode_k(src, kind, L, T, S, H, D, n_out, Gk, bits, mant,  # type: ignore[no-untyped-def]
             oidx_out, oraw_out, kb, km, kq, exps, nxt):
    """K of a page; ``nxt`` (words, same geometry) is prefetched during the last layer."""
    HD = H * D
    Tq = T - S
    Ck = H * (D - n_out)
    nk = (Tq + Gk - 1) // Gk
    w = 2 if kind == 2 else 1
    rb = Ck if bits == 8 else (Ck + 1) // 2
    ng = nk * Ck
    m_all = np.empty(L * ng, np.int32)
    X = np.empty((Tq, HD), np.float32)
    qk = np.empty(Ck, np.uint8)
    qf = np.empty(HD, np.uint8)
    inv_c = np.zeros((nk, HD), np.float32)  # full-width grids; outlier slots stay finite
    mf_c = np.zeros((nk, HD), np.float32)
    mn = np.empty(ng, np.float32)
    mx = np.empty(ng, np.float32)
    inv = np.empty(ng, np.float32)
    mf = np.empty(ng, np.float32)
    oidx = np.empty((H, n_out), np.int64)
    amax = np.zeros(HD, np.float32)
    gmn = np.empty((nk, HD), np.float32)
    gmx = np.empty((nk, HD), np.float32)
    for layer in range(L):
        for t in range(Tq):
            row = X[t]
            so = (layer * T + S + t) * HD * w
            load_row(src[so:so + HD * w], kind, row)
            if t % Gk == 0:
                copy(gmn[t // Gk], row)
                copy(gmx[t // Gk], row)
            else:
                bounds_row(row, gmn[t // Gk], gmx[t // Gk])
        # max |K| over the tokens of a channel is the larger of |min| and |max| over groups
        for c in range(HD):
            amax[c] = 0
        for g in range(nk):
            for c in range(HD):
                amax[c] = max(amax[c], max(-gmn[g, c], gmx[g, c]))
        # outliers: per head the n_out largest |K| channels, the lower index first on ties
        taken = np.zeros(HD, np.bool_)
        for h in range(H):
            for j in range(n_out):
                best = 0
                bv = np.float32(-1.0)
                for d in range(D):
                    if not taken[h * D + d] and amax[h * D + d] > bv:
                        bv = amax[h * D + d]
                        best = d
                taken[h * D + best] = True
                oidx[h, j] = best
            oidx[h].sort()
            for j in range(n_out):
                oidx_out[(layer * H + h) * n_out + j] = oidx[h, j]
        rf, rk, rl = _runs(taken, H, D)
        for g in range(nk):
            for r in range(rf.size):
                copy(mn[g * Ck + rk[r]:], gmn[g, rf[r]:rf[r] + rl[r]])
                copy(mx[g * Ck + rk[r]:], gmx[g, rf[r]:rf[r] + rl[r]])
        exps[2 * layer] = choose(mn, mx, mant, kb[layer * ng:(layer + 1) * ng],
                                 m_all[layer * ng:(layer + 1) * ng], inv, mf)
        for g in range(nk):  # outlier channels quantize to garbage codes that are dropped
            for r in range(rf.size):
                copy(inv_c[g, rf[r]:], inv[g * Ck + rk[r]:g * Ck + rk[r] + rl[r]])
                copy(mf_c[g, rf[r]:], mf[g * Ck + rk[r]:g * Ck + rk[r] + rl[r]])
        lw = T * HD * w  # words of a layer
        pf, p0 = (src, (layer + 1) * lw) if layer + 1 < L else (nxt, 0)
        per = share_size(lw - S * HD * w, Tq, 2)
        for t in range(Tq):
            prefetch_share(pf, p0 + S * HD * w, p0 + lw, t, per)
            o = (layer * Tq + t) * rb
            # the whole row is quantized (one loop; outlier channels give garbage codes),
            # then the kept channels' codes are gathered run by run: int8 ones straight into
            # the blob, int4 ones into a row that is packed
            quantize_row(X[t], inv_c[t // Gk], mf_c[t // Gk], bits, qf)
            dst = kq[o:o + rb] if bits == 8 else qk
            for r in range(rf.size):
                copy(dst[rk[r]:rk[r] + rl[r]], qf[rf[r]:rf[r] + rl[r]])
            if bits == 4:
                put_codes(qk, bits, kq[o:o + rb])
            for h in range(H):
                for j in range(n_out):
                    so = ((layer * T + S + t) * HD + h * D + oidx[h, j]) * w
                    do = ((layer * Tq + t) * H * n_out + h * n_out + j) * w
                    for i in range(w):
                        oraw_out[do + i] = src[so + i]
    put_m12(km, m_all)


@njit(**JIT)
def encode_v(src, kind, L, T, S, HD, Gv, bits, mant, vb, vm, vq,  # type: ignore[no-untyped-def]
             exps):
    """V of a page."""
    Tq = T - S
    nv = (HD + Gv - 1) // Gv
    w = 2 if kind == 2 else 1
    rb = HD if bits == 8 else (HD + 1) // 2
    ng = Tq * nv
    m_all = np.empty(L * ng, np.int32)
    X = np.empty((Tq, HD), np.float32)
    q = np.empty(HD, np.uint8)
    mn = np.empty(ng, np.float32)
    mx = np.empty(ng, np.float32)
    inv = np.empty(ng, np.float32)
    mf = np.empty(ng, np.float32)
    for layer in range(L):
        for t in range(Tq):
            row = X[t]
            so = (layer * T + S + t) * HD * w
            load_row(src[so:so + HD * w], kind, row)
            for g in range(nv):
                lo, hi = group_bounds(row, g * Gv, min(HD, (g + 1) * Gv))
                mn[t * nv + g] = lo
                mx[t * nv + g] = hi
        exps[2 * layer + 1] = choose(mn, mx, mant, vb[layer * ng:(layer + 1) * ng],
                                     m_all[layer * ng:(layer + 1) * ng], inv, mf)
        lw = T * HD * w
        nx = (layer + 1) * lw if layer + 1 < L else 0  # the last layer prefetches nothing
        per = share_size(lw - S * HD * w, Tq, 2)
        for t in range(Tq):
            prefetch_share(src, nx + S * HD * w, nx + lw if nx else 0, t, per)
            row = X[t]
            o = (layer * Tq + t) * rb
            dst = vq[o:o + rb] if bits == 8 else q  # int8: straight into the blob
            for g in range(nv):
                a, b = g * Gv, min(HD, (g + 1) * Gv)
                quantize_flat(row[a:b], inv[t * nv + g], mf[t * nv + g], bits, dst[a:b])
            if bits == 4:
                put_codes(q, bits, vq[o:o + rb])
    put_m12(vm, m_all)


@njit(**JIT)
def decode_k(kb, km, kq, oidx_in, oraw, exps, kind, L, T, S, H, D,  # type: ignore[no-untyped-def]
             n_out, Gk, bits, mant, out, nxt):
    """K of a blob into ``out``; the bytes of ``nxt`` (V's sections) are prefetched on the way,
    a share per row, so V's decode finds them in cache."""
    HD = H * D
    Tq = T - S
    Ck = H * (D - n_out)
    nk = (Tq + Gk - 1) // Gk
    w = 2 if kind == 2 else 1
    rb = Ck if bits == 8 else (Ck + 1) // 2
    ng = nk * Ck
    step = np.float32(1 if bits == 8 else 17)
    m_l = np.empty(ng, np.int32)
    s_k = np.empty(ng, np.float32)  # the layer's grid per kept channel, as the blob orders it
    m_k = np.empty(ng, np.float32)
    qk = np.empty(Ck, np.uint8)
    per = share_size(nxt.size, L * Tq, 1)
    for layer in range(L):
        tab = table(np.int64(exps[2 * layer]), mant)
        get_m12(km, layer * ng, m_l)
        for i in range(ng):
            s_k[i] = np.float32(tab[kb[layer * ng + i]])
            m_k[i] = np.float32(m_l[i])
        taken = np.zeros(HD, np.bool_)
        for h in range(H):
            for j in range(n_out):
                taken[h * D + oidx_in[(layer * H + h) * n_out + j]] = True
        rf, rk, rl = _runs(taken, H, D)
        for t in range(Tq):
            prefetch_share(nxt, 0, nxt.size, layer * Tq + t, per)
            o = (layer * Tq + t) * rb
            if bits == 8:  # int8 codes are read in place; int4 ones unpacked first
                qr = kq[o:o + rb]
            else:
                get_codes(kq[o:o + rb], bits, qk)
                qr = qk
            g0 = (t // Gk) * Ck
            do = (layer * T + S + t) * HD
            for r in range(rf.size):  # kept channels, run by run, straight into the page
                a, n = rk[r], rl[r]
                dequant_store(qr[a:a + n], m_k[g0 + a:g0 + a + n], s_k[g0 + a:g0 + a + n],
                              step, kind, out[(do + rf[r]) * w:(do + rf[r] + n) * w])
            for h in range(H):
                for j in range(n_out):
                    c = h * D + oidx_in[(layer * H + h) * n_out + j]
                    so = ((layer * Tq + t) * H * n_out + h * n_out + j) * w
                    for i in range(w):
                        out[(do + c) * w + i] = oraw[so + i]


@njit(**JIT)
def decode_v(vb, vm, vq, exps, kind, L, T, S, HD, Gv, bits, mant,  # type: ignore[no-untyped-def]
             out):
    Tq = T - S
    nv = (HD + Gv - 1) // Gv
    w = 2 if kind == 2 else 1
    rb = HD if bits == 8 else (HD + 1) // 2
    ng = Tq * nv
    step = np.float32(1 if bits == 8 else 17)
    m_l = np.empty(ng, np.int32)
    s_g = np.empty(ng, np.float32)
    m_g = np.empty(ng, np.float32)
    q = np.empty(HD, np.uint8)
    for layer in range(L):
        tab = table(np.int64(exps[2 * layer + 1]), mant)
        get_m12(vm, layer * ng, m_l)
        for i in range(ng):
            s_g[i] = np.float32(tab[vb[layer * ng + i]])
            m_g[i] = np.float32(m_l[i])
        for t in range(Tq):
            o = (layer * Tq + t) * rb
            if bits == 8:
                qr = vq[o:o + rb]
            else:
                get_codes(vq[o:o + rb], bits, q)
                qr = q
            do = (layer * T + S + t) * HD * w
            for g in range(nv):
                a, e = g * Gv, min(HD, (g + 1) * Gv)
                dequant_store_group(qr[a:e], m_g[t * nv + g], s_g[t * nv + g], step, kind,
                                    out[do + a * w:do + e * w])


@njit(**JIT)
def int8_to_int4_rows(src, rows, width, dst):  # type: ignore[no-untyped-def]
    """Rows of int8 codes -> packed int4 rows, ``q4 = (q8 + 8) // 17`` (integers only)."""
    rb = (width + 1) // 2
    q = np.empty(width, np.uint8)
    for r in range(rows):
        row = src[r * width:(r + 1) * width]
        for j in range(width):
            q[j] = np.uint8((np.int32(row[j]) + 8) // 17)
        put_codes(q, 4, dst[r * rb:(r + 1) * rb])


# --- whole pages: one dispatch per call (numba's argument checks cost microseconds each) ---

@njit(**JIT)
def _copy_sinks(src, dst, L, T, S, row, to_blob):  # type: ignore[no-untyped-def]
    """Sink tokens between a page's words and the blob's sink section ([L, S, row] words)."""
    for layer in range(L):
        for t in range(S):
            p = (layer * T + t) * row
            b = (layer * S + t) * row
            if to_blob:
                copy(dst[b:b + row], src[p:p + row])
            else:
                copy(dst[p:p + row], src[b:b + row])


@njit(**JIT)
def encode_page(k, v, blob, sec, geo, mant):  # type: ignore[no-untyped-def]
    """Write every quantized section of a page into ``blob``; ``sec`` holds (start, end) per
    section in ``layout.QUANTIZED_SECTIONS`` order, ``geo`` is
    (kind, L, T, S, H, D, n_out, Gk, Gv, bits)."""
    kind, L, T, S, H, D, n_out, Gk, Gv, bits = (geo[0], geo[1], geo[2], geo[3], geo[4],
                                                 geo[5], geo[6], geo[7], geo[8], geo[9])
    row = H * D * (2 if kind == 2 else 1)
    sink = blob[sec[4]:sec[5]].view(np.uint16)
    half = sink.size // 2
    _copy_sinks(k, sink[:half], L, T, S, row, True)
    _copy_sinks(v, sink[half:], L, T, S, row, True)
    if T == S:
        return
    exps = blob[sec[2]:sec[3]].view(np.int16)
    encode_k(k, kind, L, T, S, H, D, n_out, Gk, bits, mant, blob[sec[0]:sec[1]].view(np.int16),
             blob[sec[6]:sec[7]].view(np.uint16), blob[sec[8]:sec[9]], blob[sec[10]:sec[11]],
             blob[sec[16]:sec[17]], exps, v)
    encode_v(v, kind, L, T, S, H * D, Gv, bits, mant, blob[sec[12]:sec[13]],
             blob[sec[14]:sec[15]], blob[sec[18]:sec[19]], exps)


@njit(**JIT)
def decode_page(blob, sec, geo, mant, out):  # type: ignore[no-untyped-def]
    """Decode every section of ``blob`` into ``out``: the words of K then V.

    Returns 0, or before touching ``out`` 1 when an outlier index is out of range or not
    ascending and 2 when a scale exponent is out of range: the checksum stops accidents, not
    a forged blob, and these are the values the kernels index with unchecked.
    """
    kind, L, T, S, H, D, n_out, Gk, Gv, bits = (geo[0], geo[1], geo[2], geo[3], geo[4],
                                                 geo[5], geo[6], geo[7], geo[8], geo[9])
    oidx = blob[sec[0]:sec[1]].view(np.int16)
    exps = blob[sec[2]:sec[3]].view(np.int16)
    if T > S:
        for i in range(oidx.size):
            if oidx[i] < 0 or oidx[i] >= D or (i % n_out > 0 and oidx[i] <= oidx[i - 1]):
                return 1
        for i in range(exps.size):
            if exps[i] < -126 or exps[i] > 111:  # grid.E0_MIN, grid.E0_MAX
                return 2
    row = H * D * (2 if kind == 2 else 1)
    ok = out[:out.size // 2]
    ov = out[out.size // 2:]
    sink = blob[sec[4]:sec[5]].view(np.uint16)
    half = sink.size // 2
    _copy_sinks(sink[:half], ok, L, T, S, row, False)
    _copy_sinks(sink[half:], ov, L, T, S, row, False)
    if T == S:
        return 0
    decode_k(blob[sec[8]:sec[9]], blob[sec[10]:sec[11]], blob[sec[16]:sec[17]], oidx,
             blob[sec[6]:sec[7]].view(np.uint16), exps, kind, L, T, S, H, D, n_out, Gk, bits,
             mant, ok, blob[sec[12]:sec[19]])
    decode_v(blob[sec[12]:sec[13]], blob[sec[14]:sec[15]], blob[sec[18]:sec[19]], exps, kind,
             L, T, S, H * D, Gv, bits, mant, ov)
    return 0
