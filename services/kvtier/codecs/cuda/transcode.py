"""Triton kernels that rewrite int8 payloads as int4 or int4a payloads on the device.

Both work on the integer codes only, as :func:`kvtier.codecs.transcode` and
:func:`kvtier.codecs.alloc.from_int8` do on the host, and give the same bytes. One program per
(page, layer, part), a grid of ``(pages * L, 3)``: part 0 rewrites the layer's K codes, part 1
its V codes (``round(q8 / 17)``, two a byte), part 2 copies the layer's share of the sections
both payloads hold (grid, sinks, outliers: ``spans`` rows of source offset, destination
offset, bytes).

int4a's part 0 allocates the key bits of each (layer, head) as
:func:`kvtier.codecs.alloc.allocate` does: the channel weights from the grid alone (float64,
the same operations in the same order), then the ``budget - 2 D'`` moves of largest gain,
ties to the earlier move. Where the host sorts, the kernel finds the k-th largest gain by
bisection on its bits (gains are >= 0, so their int64 bits order as they do) and takes the
moves above it, then the first of those equal to it in move order: the same set. The codes
are packed byte by byte: each byte of a token row gathers the (at most five) codes that
overlap it, the first being the one holding the byte's first bit.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kvtier.codecs.cuda.numerics import kept_map, load_f32, m12_at, page_ptr, scale_f64

GEOMETRY = ["src_stride", "out_stride", "nspans", "scr_stride", "d_stride", "L", "Tq", "H",
            "D", "n_out", "nk", "Gk", "budget", "rb", "Ck", "HD"]


@triton.jit
def _requant_rows(src, dst, nrows, width, BT: tl.constexpr,  # type: ignore[no-untyped-def]
                  BC: tl.constexpr):
    """Rows of ``width`` int8 codes -> rows of int4 codes ``(q8 + 8) // 17``, two a byte."""
    rb = (width + 1) // 2
    for t0 in range(0, nrows, BT):
        rows = t0 + tl.arange(0, BT)
        rm = rows < nrows
        for j0 in range(0, rb, BC):
            j = j0 + tl.arange(0, BC)
            m_lo = rm[:, None] & (2 * j < width)[None, :]
            m_hi = rm[:, None] & (2 * j + 1 < width)[None, :]
            lo = tl.load(src + rows[:, None] * width + 2 * j[None, :], mask=m_lo, other=0)
            hi = tl.load(src + rows[:, None] * width + 2 * j[None, :] + 1, mask=m_hi, other=0)
            q_lo = (lo.to(tl.int32) + 8) // 17
            q_hi = tl.where(m_hi, (hi.to(tl.int32) + 8) // 17, 0)
            tl.store(dst + rows[:, None] * rb + j[None, :], (q_lo | (q_hi << 4)).to(tl.uint8),
                     mask=m_lo)


@triton.jit
def _copy_share(src, dst, spans, nspans, part, parts,  # type: ignore[no-untyped-def]
                BLOCK: tl.constexpr):
    """Copy share ``part`` of ``parts`` of every span."""
    for sp in range(0, nspans):
        a = tl.load(spans + 3 * sp)
        b = tl.load(spans + 3 * sp + 1)
        cnt = tl.load(spans + 3 * sp + 2)
        share = (cnt + parts - 1) // parts
        lo = part * share
        hi = tl.minimum(lo + share, cnt)
        for i0 in range(lo, hi, BLOCK):
            i = i0 + tl.arange(0, BLOCK)
            im = i < hi
            tl.store(dst + b + i, tl.load(src + a + i, mask=im), mask=im)


@triton.jit(do_not_specialize=GEOMETRY)
def int4_from_int8(src_ptr, src_stride, out_ptr, out_stride,  # type: ignore[no-untyped-def]
                   spans, nspans, o8_kq, o8_vq, o4_kq, o4_vq, L, Tq, Ck, HD,
                   BT: tl.constexpr, BC: tl.constexpr, BLOCK: tl.constexpr):
    """int8 payloads -> int4 payloads (see the module docstring)."""
    pid = tl.program_id(0)
    part = tl.program_id(1)
    n = (pid // L).to(tl.int64)
    layer = pid % L
    src = src_ptr + n * src_stride
    out = out_ptr + n * out_stride
    if part == 0:
        _requant_rows(src + o8_kq + layer * Tq * Ck, out + o4_kq + layer * Tq * ((Ck + 1) // 2),
                      Tq, Ck, BT, BC)
    elif part == 1:
        _requant_rows(src + o8_vq + layer * Tq * HD, out + o4_vq + layer * Tq * ((HD + 1) // 2),
                      Tq, HD, BT, BC)
    else:
        _copy_share(src, out, spans, nspans, layer, L, BLOCK)


@triton.jit(do_not_specialize=GEOMETRY)
def int4a_from_int8(src_ptr, src_stride, out_ptr, out_stride,  # type: ignore[no-untyped-def]
                    spans, nspans, scr_i, scr_stride, scr_d, d_stride, mant_ptr, drop_ptr,
                    o_exps, o_oidx, o_oraw, o_kb, o_km, o_kq8, o_vq8, o_kbits, o_kq, o_vq,
                    L, Tq, H, D, n_out, nk, Gk, budget, rb,
                    KIND: tl.constexpr, DP: tl.constexpr, DKP: tl.constexpr,
                    BT: tl.constexpr, BC: tl.constexpr, BLOCK: tl.constexpr):
    """int8 payloads -> int4a payloads (see the module docstring); ``budget`` is the key
    bits a head spends per token, ``rb`` the bytes of a K row."""
    pid = tl.program_id(0)
    part = tl.program_id(1)
    n = (pid // L).to(tl.int64)
    layer = pid % L
    src = src_ptr + n * src_stride
    out = out_ptr + n * out_stride
    HD = H * D
    if part == 0:
        if Tq > 0:
            _allocate_and_pack(src, out, scr_i + pid.to(tl.int64) * scr_stride,
                               scr_d + pid.to(tl.int64) * d_stride, mant_ptr, drop_ptr,
                               o_exps, o_oidx, o_oraw, o_kb, o_km, o_kq8, o_kbits, o_kq,
                               layer, Tq, H, D, n_out, nk, Gk, budget, rb,
                               KIND, DP, DKP, BT, BC)
    elif part == 1:
        _requant_rows(src + o_vq8 + layer * Tq * HD, out + o_vq + layer * Tq * ((HD + 1) // 2),
                      Tq, HD, BT, BC)
    else:
        _copy_share(src, out, spans, nspans, layer, L, BLOCK)


@triton.jit
def _allocate_and_pack(src, out, si, sd, mant_ptr, drop_ptr,  # type: ignore[no-untyped-def]
                       o_exps, o_oidx, o_oraw, o_kb, o_km, o_kq8, o_kbits, o_kq,
                       layer, Tq, H, D, n_out, nk, Gk, budget, rb,
                       KIND: tl.constexpr, DP: tl.constexpr, DKP: tl.constexpr,
                       BT: tl.constexpr, BC: tl.constexpr):
    HD = H * D
    Dk = D - n_out
    Ck = H * Dk
    HO = H * n_out
    # scratch: int32 [C'] kept position -> channel, [H n_out] outlier channels, [C'] bits,
    # [C'] bit offset in the row, [rb] first code of each row byte; float64 [HD] peak |K|,
    # [C'] sum of squared steps
    kch = si
    och = si + Ck
    bits = och + HO
    off = bits + Ck
    first = off + Ck
    peak = sd
    step2 = sd + HD
    e0 = tl.load((src + o_exps).to(tl.pointer_type(tl.int16)) + 2 * layer).to(tl.int32)
    kept_map((src + o_oidx).to(tl.pointer_type(tl.int16)) + layer * H * n_out, kch, och,
             H, D, n_out, DP)
    tl.debug_barrier()
    # each kept channel's squared steps (group by group, as the host adds) and reach
    kb = src + o_kb + layer * nk * Ck
    for p0 in range(0, Ck, BC):
        p = p0 + tl.arange(0, BC)
        pm = p < Ck
        c = tl.load(kch + p, mask=pm, other=0)
        acc = tl.zeros([BC], tl.float64)
        reach = tl.zeros([BC], tl.float64)
        for g in range(0, nk):
            s = scale_f64(tl.load(kb + g * Ck + p, mask=pm, other=0).to(tl.int32), e0, mant_ptr)
            m = m12_at(src + o_km, layer * nk * Ck + g * Ck + p, pm).to(tl.float64)
            ng = tl.where(g == nk - 1, Tq - g * Gk, Gk).to(tl.float64)
            acc = acc + (s * s) * ng
            r = tl.maximum(tl.abs(m * s), tl.abs((m + 255.0) * s))
            reach = tl.maximum(reach, r)
        tl.store(step2 + p, acc, mask=pm)
        tl.store(peak + c, reach, mask=pm)
    # outlier channels: their largest |value| over the tokens
    oraw = page_ptr(src + o_oraw, KIND) + layer * Tq * HO
    for o0 in range(0, HO, BC):
        o = o0 + tl.arange(0, BC)
        om = o < HO
        c = tl.load(och + o, mask=om, other=0)
        big = tl.zeros([BC], tl.float64)
        for t0 in range(0, Tq, BT):
            rows = t0 + tl.arange(0, BT)
            m2 = (rows < Tq)[:, None] & om[None, :]
            x = load_f32(oraw + rows[:, None] * HO + o[None, :], m2, KIND).to(tl.float64)
            big = tl.maximum(big, tl.max(tl.where(m2, tl.abs(x), 0.0), axis=0))
        tl.store(peak + c, big, mask=om)
    tl.debug_barrier()
    if D % 2 == 0:  # a rotary pair shares its peak
        half = D // 2
        for c0 in range(0, HD, BC):
            c = c0 + tl.arange(0, BC)
            lane = (c < HD) & (c % D < half)
            both = tl.maximum(tl.load(peak + c, mask=lane, other=0.0),
                              tl.load(peak + c + half, mask=lane, other=0.0))
            tl.store(peak + c, both, mask=lane)
            tl.store(peak + c + half, both, mask=lane)
        tl.debug_barrier()
    # the bits of each head's channels
    kk = tl.arange(0, 8)
    moves = kk < 6
    drop = tl.load(drop_ptr + kk, mask=moves, other=0.0)
    ci = tl.arange(0, DKP)
    cm = ci < Dk
    take = budget - 2 * Dk
    for h in range(0, H):
        p = h * Dk + ci
        pk = tl.load(peak + tl.load(kch + p, mask=cm, other=0), mask=cm, other=0.0)
        w = tl.load(step2 + p, mask=cm, other=0.0) * (pk * pk)
        gains = w[None, :] * drop[:, None]
        gb = tl.where(moves[:, None] & cm[None, :], gains.to(tl.int64, bitcast=True), -1)
        lo = tl.full([], 0, tl.int64)
        hi = tl.full([], 0x7FFFFFFFFFFFFFFF, tl.int64)
        for _ in range(0, 64):  # the largest v with at least `take` gains >= v
            span = hi - lo
            mid = lo + (span >> 1) + (span & 1)
            cnt = tl.sum(tl.sum(tl.where(gb >= mid, 1, 0), axis=1), axis=0)
            ok = cnt >= take
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid - 1)
        above = gb > lo
        need = take - tl.sum(tl.sum(above.to(tl.int32), axis=1), axis=0)
        eq = (gb == lo).to(tl.int32)
        row_eq = tl.sum(eq, axis=1)
        rank = (tl.cumsum(row_eq, axis=0) - row_eq)[:, None] + tl.cumsum(eq, axis=1) - eq
        taken = above | ((eq == 1) & (rank < need))
        tl.store(bits + p, 2 + tl.sum(taken.to(tl.int32), axis=0), mask=cm)
    tl.debug_barrier()
    # the bit map, each channel's offset in a row and each row byte's first code
    cb = (Ck + 1) // 2
    for j0 in range(0, cb, BC):
        j = j0 + tl.arange(0, BC)
        jm = j < cb
        b_lo = tl.load(bits + 2 * j, mask=jm, other=0)
        b_hi = tl.load(bits + 2 * j + 1, mask=jm & (2 * j + 1 < Ck), other=0)
        tl.store(out + o_kbits + layer * cb + j, (b_lo | (b_hi << 4)).to(tl.uint8), mask=jm)
    carry = tl.full([], 0, tl.int32)
    for p0 in range(0, Ck, BC):
        p = p0 + tl.arange(0, BC)
        pm = p < Ck
        w = tl.load(bits + p, mask=pm, other=0)
        incl = tl.cumsum(w, axis=0)
        start = carry + incl - w
        tl.store(off + p, start, mask=pm)
        at = (start + 7) >> 3
        tl.store(first + at, p, mask=pm & (8 * at < start + w))
        carry += tl.sum(w, axis=0)
    tl.debug_barrier()
    # the codes, byte by byte
    kq8 = src + o_kq8 + layer * Tq * Ck
    kq = out + o_kq + layer * Tq * rb
    for t0 in range(0, Tq, BT):
        rows = t0 + tl.arange(0, BT)
        rm = rows < Tq
        for j0 in range(0, rb, BC):
            j = j0 + tl.arange(0, BC)
            jm = j < rb
            f = tl.load(first + j, mask=jm, other=0)
            acc = tl.zeros([BT, BC], tl.int32)
            for k in tl.static_range(5):
                p = f + k
                pv = jm & (p < Ck)
                start = tl.load(off + p, mask=pv, other=0)
                pv = pv & (start < 8 * j + 8)
                w = tl.load(bits + p, mask=pv, other=2)
                q8 = tl.load(kq8 + rows[:, None] * Ck + p[None, :], mask=rm[:, None] & pv[None, :],
                             other=0).to(tl.int32)
                lv = ((1 << w) - 1)[None, :]
                q = (2 * q8 * lv + 255) // 510
                sh = (start - 8 * j)[None, :]
                moved = tl.where(sh >= 0, q << tl.maximum(sh, 0), q >> tl.maximum(-sh, 0))
                acc = acc | tl.where(pv[None, :], moved & 0xFF, 0)
            tl.store(kq + rows[:, None] * rb + j[None, :], acc.to(tl.uint8),
                     mask=rm[:, None] & jm[None, :])
