"""Triton kernels that encode pages into int8 and int4 payloads on the device.

One program per (page, layer, K or V), launched as a grid of ``(pages * L, 2)``: a layer of
K (or V) is read from the page, its grid chosen and its codes written, with the steps the CPU
kernels (:mod:`kvtier.codecs.cpu.int8_int4`) take in the same order:

K (groups run over tokens, per channel)::

    1 bounds    per channel block: min/max of every token group, and max |K| over all tokens
    2 outliers  per head, the n_out channels of largest max |K| (the lower index on a tie),
                ascending; the kept channels' map (kept position -> channel)
    3 grid      the layer's e0 from the largest ``need`` of the kept channels, then per group
                and kept channel the scale code, the minimum and (1 / s, m) for the codes
    4 codes     token rows, kept channels in order (int4: two a byte), outlier channels raw

V (groups run over channels, per token): 1 bounds per token group, 3 grid, 4 codes.

Phases talk through a per-program scratch area in global memory, with a barrier between
them. The 12-bit minima are written as plain integers and packed by :func:`pack_m12`, a
second launch: a pair of minima may straddle two layers (two programs). Sinks are copied by
each layer's program. Every offset (``o_*``) is into the page's payload (blob offset - 64).
"""

from __future__ import annotations

import triton
import triton.language as tl

from kvtier.codecs.cuda.numerics import (
    base_exponent, code_of, copy_bytes, load_f32, minimum_of, move_outliers, need_of,
    scale_code, scale_f64,
)

# every integer argument: Triton would otherwise compile a variant per pattern of which are
# 1 or divisible by 16 (seconds each, and layouts differ page shape to page shape)
GEOMETRY = ["page_stride", "out_stride", "scr_stride", "m_stride", "o_oidx", "o_exps", "o_sink",
            "o_oraw", "o_kb", "o_vb", "o_kq", "o_vq", "L", "T", "S", "H", "D", "n_out", "Gk",
            "nk", "Gv", "nv"]


@triton.jit(do_not_specialize=GEOMETRY)
def encode_page(k_ptr, v_ptr, page_stride, out_ptr, out_stride,  # type: ignore[no-untyped-def]
                scr_f, scr_i, scr_stride, m_ptr, m_stride, mant_ptr,
                o_oidx, o_exps, o_sink, o_oraw, o_kb, o_vb, o_kq, o_vq,
                L, T, S, H, D, n_out, Gk, nk, Gv, nv,
                KIND: tl.constexpr, BITS: tl.constexpr, DP: tl.constexpr,
                GB: tl.constexpr, VT: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """Encode layer ``program_id(0) % L`` of page ``program_id(0) // L``: K when
    ``program_id(1)`` is 0, V when 1.

    ``scr_f``/``scr_i``: float32/int32 scratch, ``scr_stride`` elements per program (see
    :func:`kvtier.codecs.cuda.launch.encode`); ``m_ptr``: the int32 minima of every group, K's
    ``[L, nk, C']`` then V's ``[L, T', nv]`` per page (``m_stride`` a page).
    """
    pid = tl.program_id(0)
    kv = tl.program_id(1)
    n = (pid // L).to(tl.int64)
    layer = pid % L
    HD = H * D
    Tq = T - S
    Ck = H * (D - n_out)
    prog = (pid.to(tl.int64) * 2 + kv) * scr_stride
    if kv == 0:
        src = k_ptr + n * page_stride + layer * T * HD
    else:
        src = v_ptr + n * page_stride + layer * T * HD
    out = out_ptr + n * out_stride
    sink = (out + o_sink).to(k_ptr.dtype) + (kv * L + layer) * S * HD
    copy_bytes(src, sink, S * HD, 1024)
    if Tq > 0:
        x0 = src + S * HD  # the first quantized token
        exps = (out + o_exps).to(tl.pointer_type(tl.int16))
        if kv == 0:
            m_out = m_ptr + n * m_stride + layer * nk * Ck
            _encode_k(x0, out, scr_f + prog, scr_i + prog, m_out, mant_ptr, exps, o_oidx,
                      o_oraw, o_kb, o_kq, k_ptr, layer, L, Tq, H, D, n_out, Gk, nk,
                      KIND, BITS, DP, BT, BC)
        else:
            m_out = m_ptr + n * m_stride + L * nk * Ck + layer * Tq * nv
            _encode_v(x0, out, scr_f + prog, m_out, mant_ptr, exps, o_vb, o_vq, layer, Tq,
                      HD, Gv, nv, KIND, BITS, GB, VT, BT, BC)


@triton.jit
def _encode_k(x0, out, sf, si, m_out, mant_ptr, exps, o_oidx,  # type: ignore[no-untyped-def]
              o_oraw, o_kb, o_kq, k_ptr, layer, L, Tq, H, D, n_out, Gk, nk,
              KIND: tl.constexpr, BITS: tl.constexpr, DP: tl.constexpr,
              BT: tl.constexpr, BC: tl.constexpr):
    HD = H * D
    Dk = D - n_out
    Ck = H * Dk
    # scratch: float32 [nk, HD] minima, [nk, HD] maxima, [HD] max |K|, [nk, C'] 1/s,
    # [nk, C'] m; int32 [C'] kept position -> channel, [H * n_out] outlier channels
    kmn = sf
    kmx = sf + nk * HD
    amax = sf + 2 * nk * HD
    kinv = amax + HD
    kmf = kinv + nk * Ck
    kch = si
    och = si + Ck
    # 1 bounds
    for c0 in range(0, HD, BC):
        cols = c0 + tl.arange(0, BC)
        cm = cols < HD
        big = tl.zeros([BC], tl.float32)
        for g in range(0, nk):
            t_hi = tl.minimum(g * Gk + Gk, Tq)
            lo = tl.full([BC], float("inf"), tl.float32)
            hi = tl.full([BC], float("-inf"), tl.float32)
            for t0 in range(g * Gk, t_hi, BT):
                rows = t0 + tl.arange(0, BT)
                m2 = (rows < t_hi)[:, None] & cm[None, :]
                x = load_f32(x0 + rows[:, None] * HD + cols[None, :], m2, KIND)
                lo = tl.minimum(lo, tl.min(tl.where(m2, x, float("inf")), axis=0))
                hi = tl.maximum(hi, tl.max(tl.where(m2, x, float("-inf")), axis=0))
            tl.store(kmn + g * HD + cols, lo, mask=cm)
            tl.store(kmx + g * HD + cols, hi, mask=cm)
            big = tl.maximum(big, tl.maximum(-lo, hi))
        tl.store(amax + cols, big, mask=cm)
    tl.debug_barrier()
    # 2 outliers, ascending per head; the kept channels in order
    d = tl.arange(0, DP)
    dm = d < D
    oidx = (out + o_oidx).to(tl.pointer_type(tl.int16)) + layer * H * n_out
    for h in range(0, H):
        a = tl.load(amax + h * D + d, mask=dm, other=-1.0)
        taken = tl.zeros([DP], tl.int32)
        for j in range(0, n_out):
            cand = tl.where((taken == 0) & dm, a, -1.0)
            best = tl.max(cand, axis=0)
            first = tl.min(tl.where(cand == best, d, DP), axis=0)
            taken = tl.where(d == first, 1, taken)
        before = tl.cumsum(taken, axis=0)  # outliers up to and including d
        is_out = taken == 1
        tl.store(oidx + h * n_out + before - 1, d.to(tl.int16), mask=is_out)
        tl.store(och + h * n_out + before - 1, h * D + d, mask=is_out)
        tl.store(kch + h * Dk + d - before, h * D + d, mask=dm & (taken == 0))
    tl.debug_barrier()
    # 3 grid: e0 over the kept channels' groups, then each group's code, minimum, 1/s and m
    top = tl.full([], 0, tl.int64)
    for g in range(0, nk):
        for p0 in range(0, Ck, BC):
            p = p0 + tl.arange(0, BC)
            pm = p < Ck
            c = tl.load(kch + p, mask=pm, other=0)
            nd = need_of(tl.load(kmn + g * HD + c, mask=pm, other=0.0),
                         tl.load(kmx + g * HD + c, mask=pm, other=0.0))
            top = tl.maximum(top, tl.max(tl.where(pm, nd.to(tl.int64, bitcast=True), 0), axis=0))
    e0 = base_exponent(top)
    tl.store(exps + 2 * layer, e0.to(tl.int16))
    kb = out + o_kb + layer * nk * Ck
    for g in range(0, nk):
        for p0 in range(0, Ck, BC):
            p = p0 + tl.arange(0, BC)
            pm = p < Ck
            c = tl.load(kch + p, mask=pm, other=0)
            mn = tl.load(kmn + g * HD + c, mask=pm, other=0.0)
            nd = need_of(mn, tl.load(kmx + g * HD + c, mask=pm, other=0.0))
            b = scale_code(nd, e0, mant_ptr)
            s = scale_f64(b, e0, mant_ptr)
            m = minimum_of(mn, s)
            tl.store(kb + g * Ck + p, b.to(tl.uint8), mask=pm)
            tl.store(m_out + g * Ck + p, m, mask=pm)
            tl.store(kinv + g * Ck + p, tl.math.div_rn(1.0, s.to(tl.float32)), mask=pm)
            tl.store(kmf + g * Ck + p, m.to(tl.float32), mask=pm)
    tl.debug_barrier()
    # 4 codes, token rows of kept channels
    if BITS == 8:
        kq = out + o_kq + layer * Tq * Ck
        for t0 in range(0, Tq, BT):
            rows = t0 + tl.arange(0, BT)
            rm = rows < Tq
            tg = rows // Gk
            for p0 in range(0, Ck, BC):
                p = p0 + tl.arange(0, BC)
                pm = p < Ck
                m2 = rm[:, None] & pm[None, :]
                c = tl.load(kch + p, mask=pm, other=0)
                x = load_f32(x0 + rows[:, None] * HD + c[None, :], m2, KIND)
                gp = tg[:, None] * Ck + p[None, :]
                q = code_of(x, tl.load(kinv + gp, mask=m2, other=1.0),
                            tl.load(kmf + gp, mask=m2, other=0.0), 8)
                tl.store(kq + rows[:, None] * Ck + p[None, :], q.to(tl.uint8), mask=m2)
    else:
        rb = (Ck + 1) // 2
        kq = out + o_kq + layer * Tq * rb
        for t0 in range(0, Tq, BT):
            rows = t0 + tl.arange(0, BT)
            rm = rows < Tq
            tg = rows // Gk
            for j0 in range(0, rb, BC):
                j = j0 + tl.arange(0, BC)
                p_lo = 2 * j
                p_hi = 2 * j + 1
                m_lo = rm[:, None] & (p_lo < Ck)[None, :]
                m_hi = rm[:, None] & (p_hi < Ck)[None, :]
                c_lo = tl.load(kch + p_lo, mask=p_lo < Ck, other=0)
                c_hi = tl.load(kch + p_hi, mask=p_hi < Ck, other=0)
                x_lo = load_f32(x0 + rows[:, None] * HD + c_lo[None, :], m_lo, KIND)
                x_hi = load_f32(x0 + rows[:, None] * HD + c_hi[None, :], m_hi, KIND)
                g_lo = tg[:, None] * Ck + p_lo[None, :]
                g_hi = tg[:, None] * Ck + p_hi[None, :]
                q_lo = code_of(x_lo, tl.load(kinv + g_lo, mask=m_lo, other=1.0),
                               tl.load(kmf + g_lo, mask=m_lo, other=0.0), 4)
                q_hi = code_of(x_hi, tl.load(kinv + g_hi, mask=m_hi, other=1.0),
                               tl.load(kmf + g_hi, mask=m_hi, other=0.0), 4)
                q_hi = tl.where(m_hi, q_hi, 0)
                tl.store(kq + rows[:, None] * rb + j[None, :], (q_lo | (q_hi << 4)).to(tl.uint8),
                         mask=m_lo)
    # outlier channels, as put
    oraw = (out + o_oraw).to(k_ptr.dtype) + layer * Tq * H * n_out
    move_outliers(x0, oraw, och, Tq, HD, H * n_out, True, BT, BC)


@triton.jit
def _encode_v(x0, out, sf, m_out, mant_ptr, exps, o_vb, o_vq,  # type: ignore[no-untyped-def]
              layer, Tq, HD, Gv, nv,
              KIND: tl.constexpr, BITS: tl.constexpr, GB: tl.constexpr,
              VT: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    # scratch: float32 [T', nv] minima then 1/s, [T', nv] maxima then m (in place)
    vlo = sf
    vhi = sf + Tq * nv
    # 1 bounds of every (token, group), and the layer's largest need; VT token rows a tile
    # (a group is narrow: more rows keep as many bytes in flight as the other phases)
    top = tl.full([], 0, tl.int64)
    for t0 in range(0, Tq, VT):
        rows = t0 + tl.arange(0, VT)
        rm = rows < Tq
        for g in range(0, nv):
            c_hi = tl.minimum(g * Gv + Gv, HD)
            lo = tl.full([VT], float("inf"), tl.float32)
            hi = tl.full([VT], float("-inf"), tl.float32)
            for c0 in range(g * Gv, c_hi, GB):
                cols = c0 + tl.arange(0, GB)
                m2 = rm[:, None] & (cols < c_hi)[None, :]
                x = load_f32(x0 + rows[:, None] * HD + cols[None, :], m2, KIND)
                lo = tl.minimum(lo, tl.min(tl.where(m2, x, float("inf")), axis=1))
                hi = tl.maximum(hi, tl.max(tl.where(m2, x, float("-inf")), axis=1))
            tl.store(vlo + rows * nv + g, lo, mask=rm)
            tl.store(vhi + rows * nv + g, hi, mask=rm)
            nd = need_of(tl.where(rm, lo, 0.0), tl.where(rm, hi, 0.0))
            top = tl.maximum(top, tl.max(tl.where(rm, nd.to(tl.int64, bitcast=True), 0), axis=0))
    e0 = base_exponent(top)
    tl.store(exps + 2 * layer + 1, e0.to(tl.int16))
    tl.debug_barrier()
    # 3 grid of every group (each lane reads and rewrites its own group)
    ng = Tq * nv
    vb = out + o_vb + layer * ng
    for i0 in range(0, ng, BC):
        i = i0 + tl.arange(0, BC)
        im = i < ng
        mn = tl.load(vlo + i, mask=im, other=0.0)
        nd = need_of(mn, tl.load(vhi + i, mask=im, other=0.0))
        b = scale_code(nd, e0, mant_ptr)
        s = scale_f64(b, e0, mant_ptr)
        m = minimum_of(mn, s)
        tl.store(vb + i, b.to(tl.uint8), mask=im)
        tl.store(m_out + i, m, mask=im)
        tl.store(vlo + i, tl.math.div_rn(1.0, s.to(tl.float32)), mask=im)
        tl.store(vhi + i, m.to(tl.float32), mask=im)
    tl.debug_barrier()
    # 4 codes
    if BITS == 8:
        vq = out + o_vq + layer * Tq * HD
        for t0 in range(0, Tq, BT):
            rows = t0 + tl.arange(0, BT)
            rm = rows < Tq
            for c0 in range(0, HD, BC):
                cols = c0 + tl.arange(0, BC)
                m2 = rm[:, None] & (cols < HD)[None, :]
                x = load_f32(x0 + rows[:, None] * HD + cols[None, :], m2, KIND)
                gi = rows[:, None] * nv + cols[None, :] // Gv
                q = code_of(x, tl.load(vlo + gi, mask=m2, other=1.0),
                            tl.load(vhi + gi, mask=m2, other=0.0), 8)
                tl.store(vq + rows[:, None] * HD + cols[None, :], q.to(tl.uint8), mask=m2)
    else:
        rb = (HD + 1) // 2
        vq = out + o_vq + layer * Tq * rb
        for t0 in range(0, Tq, BT):
            rows = t0 + tl.arange(0, BT)
            rm = rows < Tq
            for j0 in range(0, rb, BC):
                j = j0 + tl.arange(0, BC)
                c_lo = 2 * j
                c_hi = 2 * j + 1
                m_lo = rm[:, None] & (c_lo < HD)[None, :]
                m_hi = rm[:, None] & (c_hi < HD)[None, :]
                x_lo = load_f32(x0 + rows[:, None] * HD + c_lo[None, :], m_lo, KIND)
                x_hi = load_f32(x0 + rows[:, None] * HD + c_hi[None, :], m_hi, KIND)
                g_lo = rows[:, None] * nv + c_lo[None, :] // Gv
                g_hi = rows[:, None] * nv + c_hi[None, :] // Gv
                q_lo = code_of(x_lo, tl.load(vlo + g_lo, mask=m_lo, other=1.0),
                               tl.load(vhi + g_lo, mask=m_lo, other=0.0), 4)
                q_hi = code_of(x_hi, tl.load(vlo + g_hi, mask=m_hi, other=1.0),
                               tl.load(vhi + g_hi, mask=m_hi, other=0.0), 4)
                q_hi = tl.where(m_hi, q_hi, 0)
                tl.store(vq + rows[:, None] * rb + j[None, :], (q_lo | (q_hi << 4)).to(tl.uint8),
                         mask=m_lo)


@triton.jit(do_not_specialize=["m_stride", "out_stride", "o_km", "o_vm", "nk_all", "nv_all"])
def pack_m12(m_ptr, m_stride, out_ptr, out_stride, o_km, o_vm,  # type: ignore[no-untyped-def]
             nk_all, nv_all, BLOCK: tl.constexpr):
    """Pack the int32 minima of every page (``[pages, nk_all + nv_all]``: K's then V's) into
    the ``km`` and ``vm`` sections: program ``(page, block, K or V)``, ``BLOCK`` pairs each."""
    n = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    kv = tl.program_id(2)
    count = tl.where(kv == 0, nk_all, nv_all)
    src = m_ptr + n * m_stride + tl.where(kv == 0, 0, nk_all)
    dst = out_ptr + n * out_stride + tl.where(kv == 0, o_km, o_vm)
    pair = blk * BLOCK + tl.arange(0, BLOCK)
    pm = 2 * pair < count
    u0 = tl.load(src + 2 * pair, mask=pm, other=0) & 0xFFF
    u1 = tl.load(src + 2 * pair + 1, mask=pm & (2 * pair + 1 < count), other=0) & 0xFFF
    tl.store(dst + 3 * pair, (u0 & 0xFF).to(tl.uint8), mask=pm)
    tl.store(dst + 3 * pair + 1, (u1 & 0xFF).to(tl.uint8), mask=pm)
    tl.store(dst + 3 * pair + 2, ((u0 >> 8) | ((u1 >> 8) << 4)).to(tl.uint8), mask=pm)
