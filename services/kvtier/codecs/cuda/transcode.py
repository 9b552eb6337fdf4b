"""Triton kernels that rewrite int8 payloads as int4 or int4a payloads on the device.

Both work on the integer codes only, as :func:`kvtier.codecs.transcode` and
:func:`kvtier.codecs.int4a.from_int8` do on the host, and give the same bytes. One program per
(page, layer, part), a grid of ``(pages * L, 3)``: part 0 rewrites the layer's K codes, part 1
its V codes (``round(q8 / 17)``, two a byte), part 2 copies the layer's share of the sections
both payloads hold (grid, sinks, outliers: ``spans`` rows of source offset, destination
offset, bytes).

int4a takes two launches. :func:`int4a_bits` allocates the key bits of each (page, layer,
head), one program each, as :func:`kvtier.codecs.int4a.allocate` does: the channel weights from
the grid alone (float64, the same operations in the same order), then the ``budget - 2 D'``
moves of largest gain, ties to the earlier move. Where the host sorts, the kernel finds the
k-th largest gain by bisection on its bits (gains are >= 0, so their int64 bits order as they
do) and takes the moves above it, then the first of those equal to it in move order: the same
set. :func:`int4a_from_int8`'s part 0 then writes the bit map and packs the codes byte by
byte: each byte of a token row gathers the (at most five) codes that overlap it, the first
being the one holding the byte's first bit.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kvtier.codecs.cuda.numerics import load_f32, m12_at, page_ptr, scale_f64

GEOMETRY = [  # every integer argument (see kvtier.codecs.cuda.encode.GEOMETRY)
    "src_stride", "out_stride", "bits_stride", "nspans", "scr_stride", "o8_kq", "o8_vq",
    "o4_kq", "o4_vq", "o_exps", "o_oidx", "o_oraw", "o_kb", "o_km", "o_kq8", "o_vq8",
    "o_kbits", "o_kq", "o_vq", "L", "Tq", "H", "D", "n_out", "nk", "Gk", "budget", "rb", "Ck",
    "HD"]


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
def int4a_bits(src_ptr, src_stride, bits_ptr, bits_stride,  # type: ignore[no-untyped-def]
               scr_d, mant_ptr, drop_ptr, o_exps, o_oidx, o_oraw, o_kb, o_km,
               L, Tq, H, D, n_out, nk, Gk, budget,
               KIND: tl.constexpr, DP: tl.constexpr, BT: tl.constexpr):
    """The key bits of head ``program_id(1)`` of layer ``program_id(0) % L`` of int8 payload
    ``program_id(0) // L`` (int32, into ``bits_ptr``: ``[pages * L, C']``); nothing when every
    token is a sink. A head's allocation needs nothing of the other heads (a rotary pair lies
    within a head), so each gets a program: the selection is a sequence of reductions, and
    many short programs finish sooner than one long one per layer."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    n = (pid // L).to(tl.int64)
    layer = pid % L
    if Tq > 0:
        src = src_ptr + n * src_stride
        Dk = D - n_out
        Ck = H * Dk
        e0 = tl.load((src + o_exps).to(tl.pointer_type(tl.int16)) + 2 * layer).to(tl.int32)
        # lanes are the head's channels d; kept ones are the quantized channels, in order
        d = tl.arange(0, DP)
        dm = d < D
        oidx = (src + o_oidx).to(tl.pointer_type(tl.int16)) + (layer * H + h) * n_out
        taken = tl.zeros([DP], tl.int32)
        for j in range(0, n_out):
            taken = tl.where(d == tl.load(oidx + j).to(tl.int32), 1, taken)
        before = tl.cumsum(taken, axis=0)  # outliers up to and including d
        kept = dm & (taken == 0)
        p = h * Dk + d - before  # the kept position of lane d
        # each kept channel's squared steps (group by group, as the host adds) and reach
        kb = src + o_kb + layer * nk * Ck
        acc = tl.zeros([DP], tl.float64)
        reach = tl.zeros([DP], tl.float64)
        for g in range(0, nk):
            s = scale_f64(tl.load(kb + g * Ck + p, mask=kept, other=0).to(tl.int32), e0,
                          mant_ptr)
            m = m12_at(src + o_km, layer * nk * Ck + g * Ck + p, kept).to(tl.float64)
            ng = tl.where(g == nk - 1, Tq - g * Gk, Gk).to(tl.float64)
            acc = acc + (s * s) * ng
            reach = tl.maximum(reach, tl.maximum(tl.abs(m * s), tl.abs((m + 255.0) * s)))
        # outlier channels: their largest |value| over the tokens
        HO = H * n_out
        oraw = page_ptr(src + o_oraw, KIND) + layer * Tq * HO + h * n_out
        outl = taken == 1
        big = tl.zeros([DP], tl.float64)
        for t0 in range(0, Tq, BT):
            rows = t0 + tl.arange(0, BT)
            m2 = (rows < Tq)[:, None] & outl[None, :]
            x = load_f32(oraw + rows[:, None] * HO + (before - 1)[None, :], m2, KIND)
            big = tl.maximum(big, tl.max(tl.where(m2, tl.abs(x.to(tl.float64)), 0.0), axis=0))
        peak = tl.where(outl, big, tl.where(kept, reach, 0.0))
        if D % 2 == 0:  # a rotary pair shares its peak: through scratch, lane to lane
            sd = scr_d + (pid.to(tl.int64) * H + h) * DP
            tl.store(sd + d, peak, mask=dm)
            tl.debug_barrier()
            half = D // 2
            partner = tl.where(d < half, d + half, d - half)
            peak = tl.maximum(peak, tl.load(sd + partner, mask=dm, other=0.0))
        w = acc * (peak * peak)
        # the budget - 2 D' moves of largest gain (w_c times the step drop of its k-th bit),
        # ties to the earlier move (k, then c): the take-th largest gain by bisection on its
        # bits, stopping once exactly `take` gains lie at or above the probe
        kk = tl.arange(0, 8)
        moves = kk < 6
        drop = tl.load(drop_ptr + kk, mask=moves, other=0.0)
        valid = moves[:, None] & kept[None, :]
        gains = w[None, :] * drop[:, None]
        gb = tl.where(valid, gains.to(tl.int64, bitcast=True), -1)
        take = budget - 2 * Dk
        top = 0x7FFFFFFFFFFFFFFF
        lo = tl.full([], 0, tl.int64)
        hi = tl.full([], top, tl.int64)
        while lo < hi:
            span = hi - lo
            mid = lo + (span >> 1) + (span & 1)
            cnt = tl.sum(tl.sum(tl.where(gb >= mid, 1, 0), axis=1), axis=0)
            least = tl.min(tl.min(tl.where(gb >= mid, gb, top), axis=1), axis=0)
            exact = cnt == take  # the take-th largest is the least of those >= mid
            lo = tl.where(exact, least, tl.where(cnt >= take, mid, lo))
            hi = tl.where(exact, least, tl.where(cnt >= take, hi, mid - 1))
        above = gb > lo
        need = take - tl.sum(tl.sum(above.to(tl.int32), axis=1), axis=0)
        eq = (gb == lo).to(tl.int32)
        row_eq = tl.sum(eq, axis=1)
        rank = (tl.cumsum(row_eq, axis=0) - row_eq)[:, None] + tl.cumsum(eq, axis=1) - eq
        chosen = above | ((eq == 1) & (rank < need))
        tl.store(bits_ptr + pid.to(tl.int64) * bits_stride + p,
                 2 + tl.sum(chosen.to(tl.int32), axis=0), mask=kept)


@triton.jit(do_not_specialize=GEOMETRY)
def int4a_from_int8(src_ptr, src_stride, out_ptr, out_stride,  # type: ignore[no-untyped-def]
                    spans, nspans, bits_ptr, bits_stride, scr_i, scr_stride,
                    o_kq8, o_vq8, o_kbits, o_kq, o_vq, L, Tq, H, D, n_out, rb,
                    BT: tl.constexpr, BC: tl.constexpr, BLOCK: tl.constexpr):
    """int8 payloads -> int4a payloads (see the module docstring), with the key bits
    :func:`int4a_bits` chose; ``rb`` is the bytes of a K row."""
    pid = tl.program_id(0)
    part = tl.program_id(1)
    n = (pid // L).to(tl.int64)
    layer = pid % L
    src = src_ptr + n * src_stride
    out = out_ptr + n * out_stride
    HD = H * D
    if part == 0:
        if Tq > 0:
            _pack_keys(src, out, bits_ptr + pid.to(tl.int64) * bits_stride,
                       scr_i + pid.to(tl.int64) * scr_stride, o_kq8, o_kbits, o_kq,
                       layer, Tq, H, D, n_out, rb, BT, BC)
    elif part == 1:
        _requant_rows(src + o_vq8 + layer * Tq * HD, out + o_vq + layer * Tq * ((HD + 1) // 2),
                      Tq, HD, BT, BC)
    else:
        _copy_share(src, out, spans, nspans, layer, L, BLOCK)


@triton.jit
def _pack_keys(src, out, bits, si, o_kq8, o_kbits, o_kq,  # type: ignore[no-untyped-def]
               layer, Tq, H, D, n_out, rb, BT: tl.constexpr, BC: tl.constexpr):
    Ck = H * (D - n_out)
    # scratch: int32 [C'] bit offset in the row, [rb] first code of each row byte
    off = si
    first = off + Ck
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
