"""Triton kernels that encode pages into int8 and int4 payloads on the device.

Two passes over the page, each one launch over many small programs, with the steps the CPU
kernels (:mod:`kvtier.codecs.cpu.int8_int4`) take and the same arithmetic:

``encode_bounds``, a grid of ``(pages * L, 2, max(H, row chunks))``:

* K, one program per (page, layer, head): the head's sink rows copied; per token group the
  minimum and maximum of each channel (kept elementwise over the group's row tiles, reduced
  once a group), and the channel's largest ``|K|``; the head's ``n_out`` outlier channels
  (largest ``|K|``, the lower index on a tie, written ascending to ``oidx``); the largest
  ``need`` among the head's kept channels, whose maximum over the heads gives the layer's e0;
* V, one program per (page, layer, ``VR`` token rows): chunk 0 copies the layer's sink rows;
  per row the bounds of each channel group, and the rows' largest ``need``.

``encode_codes``, a grid of ``(pages * L, 2, max(K groups * channel chunks, row chunks))``:

* K, one program per (page, layer, token group, ``BC`` kept positions): the layer's e0 from
  the heads' partial maxima (the first program writes it to ``exps``), the group's scale code,
  minimum and ``(1 / s, m)`` of each position (kept positions stand for the channels
  :func:`~kvtier.codecs.cuda.numerics.kept_channel` gives), then the codes of the group's
  token rows (int4: two a byte; a chunk is whole bytes). The first program of a layer copies
  its outlier channels, as put;
* V, one program per (page, layer, ``VR`` token rows): e0 likewise; group by group each row's
  grid, then the group's codes, read and written ``VEC`` elements at a time.

The passes talk through scratch in global memory (bounds, partial maxima). The 12-bit minima
are written as plain integers and packed by :func:`pack_m12`, a third launch: a pair of minima
may straddle two programs. Every offset (``o_*``) is into the page's payload (blob offset -
64). ``VEC`` is the launcher's promise that ``D`` and V's group length are multiples of
``VEC`` elements (:func:`kvtier.codecs.cuda.launch.vec_of`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from kvtier.codecs.cuda.numerics import (
    aligned, base_exponent, code_of, copy_bytes, kept_channel, load_f32, minimum_of, move_outliers,
    need_of, scale_code, scale_f64,
)

# every integer argument: Triton would otherwise compile a variant per pattern of which are
# 1 or divisible by 16 (seconds each, and layouts differ page shape to page shape)
GEOMETRY = ["page_stride", "out_stride", "scr_stride", "top_stride", "m_stride", "q8_stride",
            "o_oidx", "o_exps", "o_sink", "o_oraw", "o_kb", "o_vb", "o_kq", "o_vq", "L", "T", "S",
            "H", "D", "n_out", "Gk", "nk", "Gv", "nv"]


@triton.jit
def _program(L, D, out_ptr, out_stride, scr_f, scr_stride, top_ptr,  # type: ignore[no-untyped-def]
             top_stride, VEC: tl.constexpr):
    """What a program of either pass works on: K or V, its part of the layer, its page and
    layer, ``D`` (aligned), and the page's payload, scratch and partial maxima."""
    pid = tl.program_id(0)
    kv = tl.program_id(1)
    n = (pid // L).to(tl.int64)
    out = out_ptr + n * aligned(out_stride, 8)
    sf = scr_f + pid.to(tl.int64) * scr_stride
    tops = top_ptr + (pid.to(tl.int64) * 2 + kv) * top_stride
    return kv, tl.program_id(2), n, pid % L, aligned(D, VEC), out, sf, tops


@triton.jit(do_not_specialize=GEOMETRY)
def encode_bounds(k_ptr, v_ptr, page_stride, out_ptr, out_stride,  # type: ignore[no-untyped-def]
                  scr_f, scr_stride, top_ptr, top_stride, o_oidx, o_sink,
                  L, T, S, H, D, n_out, Gk, nk, Gv, nv,
                  KIND: tl.constexpr, DP: tl.constexpr, GB: tl.constexpr, VEC: tl.constexpr,
                  BT: tl.constexpr, VR: tl.constexpr):
    """The first pass (see the module docstring): program ``(page * L + layer, K or V,
    head or row chunk)``. ``scr_f``: float32 per (page, layer), ``scr_stride`` apart: K's
    ``[nk, H D]`` minima, ``[nk, H D]`` maxima, then V's ``[T', nv]`` minima and maxima;
    ``top_ptr``: int64 ``[pages * L, 2, top_stride]``, the partial maxima of ``need``'s bits."""
    kv, part, n, layer, D, out, sf, tops = _program(L, D, out_ptr, out_stride, scr_f,
                                                    scr_stride, top_ptr, top_stride, VEC)
    HD = H * D
    Tq = T - S
    if kv == 0:
        src = k_ptr + n * aligned(page_stride, VEC) + layer * T * HD
        if part < H:
            h = part
            sink = (out + o_sink).to(k_ptr.dtype) + layer * S * HD
            d = tl.arange(0, DP)
            dm = d < D
            for t0 in range(0, S, BT):
                rows = t0 + tl.arange(0, BT)
                at = rows[:, None] * HD + h * D + d[None, :]
                m2 = (rows < S)[:, None] & dm[None, :]
                tl.store(sink + at, tl.load(src + at, mask=m2), mask=m2)
            if Tq > 0:
                oidx = (out + o_oidx).to(tl.pointer_type(tl.int16)) + (layer * H + h) * n_out
                _k_bounds(src + S * HD + h * D, sf, sf + nk * HD, tops + h, oidx, h, Tq, HD,
                          D, n_out, Gk, nk, KIND, DP, BT)
    else:
        src = v_ptr + n * aligned(page_stride, VEC) + layer * T * HD
        if part == 0:
            sink = (out + o_sink).to(k_ptr.dtype) + (L + layer) * S * HD
            copy_bytes(src, sink, S * HD, 1024)
        if part * VR < Tq:
            vlo = sf + 2 * nk * HD
            _v_bounds(src + S * HD, vlo, vlo + Tq * nv, tops + part, part, Tq, HD, Gv, nv,
                      KIND, GB, VEC, VR)


@triton.jit
def _k_bounds(x0, kmn, kmx, top, oidx, h, Tq, HD, D, n_out, Gk,  # type: ignore[no-untyped-def]
              nk, KIND: tl.constexpr, DP: tl.constexpr, BT: tl.constexpr):
    """Head ``h`` of a layer of K (``x0``: its first quantized token, channel 0)."""
    d = tl.arange(0, DP)
    dm = d < D
    big = tl.zeros([DP], tl.float32)
    for g in range(0, nk):
        t_hi = tl.minimum(g * Gk + Gk, Tq)
        lo = tl.full([BT, DP], float("inf"), tl.float32)
        hi = tl.full([BT, DP], float("-inf"), tl.float32)
        for t0 in range(g * Gk, t_hi, BT):
            rows = t0 + tl.arange(0, BT)
            m2 = (rows < t_hi)[:, None] & dm[None, :]
            x = load_f32(x0 + rows[:, None] * HD + d[None, :], m2, KIND)
            lo = tl.minimum(lo, tl.where(m2, x, float("inf")))
            hi = tl.maximum(hi, tl.where(m2, x, float("-inf")))
        glo = tl.min(lo, axis=0)
        ghi = tl.max(hi, axis=0)
        tl.store(kmn + g * HD + h * D + d, glo, mask=dm)
        tl.store(kmx + g * HD + h * D + d, ghi, mask=dm)
        big = tl.maximum(big, tl.maximum(-glo, ghi))
    # outliers, ascending: the n_out channels of largest max |K|, the lower index on a tie
    a = tl.where(dm, big, -1.0)
    taken = tl.zeros([DP], tl.int32)
    for _ in range(0, n_out):
        cand = tl.where((taken == 0) & dm, a, -1.0)
        best = tl.max(cand, axis=0)
        first = tl.min(tl.where(cand == best, d, DP), axis=0)
        taken = tl.where(d == first, 1, taken)
    before = tl.cumsum(taken, axis=0)  # outliers up to and including d
    tl.store(oidx + before - 1, d.to(tl.int16), mask=taken == 1)
    # the largest need of the head's kept channels (read back what this program wrote)
    tl.debug_barrier()
    kept = dm & (taken == 0)
    best_need = tl.full([], 0, tl.int64)
    for g in range(0, nk):
        nd = need_of(tl.load(kmn + g * HD + h * D + d, mask=kept, other=0.0),
                     tl.load(kmx + g * HD + h * D + d, mask=kept, other=0.0))
        best_need = tl.maximum(best_need, tl.max(tl.where(kept, nd.to(tl.int64, bitcast=True),
                                                          0), axis=0))
    tl.store(top, best_need)


@triton.jit
def _v_bounds(x0, vlo, vhi, top, part, Tq, HD, Gv, nv,  # type: ignore[no-untyped-def]
              KIND: tl.constexpr, GB: tl.constexpr, VEC: tl.constexpr, VR: tl.constexpr):
    """Token rows ``[part VR, part VR + VR)`` of a layer of V: every group's bounds."""
    rows = part * VR + tl.arange(0, VR)
    rm = rows < Tq
    Gv = aligned(Gv, VEC)
    best_need = tl.full([], 0, tl.int64)
    for g in range(0, nv):
        c_hi = tl.minimum(g * Gv + Gv, HD)
        lo = tl.full([VR, GB], float("inf"), tl.float32)
        hi = tl.full([VR, GB], float("-inf"), tl.float32)
        for c0 in range(g * Gv, c_hi, GB):
            cols = c0 + tl.arange(0, GB)
            m2 = rm[:, None] & (cols < c_hi)[None, :]
            x = load_f32(x0 + rows[:, None] * HD + cols[None, :], m2, KIND)
            lo = tl.minimum(lo, tl.where(m2, x, float("inf")))
            hi = tl.maximum(hi, tl.where(m2, x, float("-inf")))
        glo = tl.min(lo, axis=1)
        ghi = tl.max(hi, axis=1)
        tl.store(vlo + rows * nv + g, glo, mask=rm)
        tl.store(vhi + rows * nv + g, ghi, mask=rm)
        nd = need_of(tl.where(rm, glo, 0.0), tl.where(rm, ghi, 0.0))
        best_need = tl.maximum(best_need, tl.max(tl.where(rm, nd.to(tl.int64, bitcast=True), 0),
                                                 axis=0))
    tl.store(top, best_need)


@triton.jit
def _layer_e0(tops, count, CP: tl.constexpr):  # type: ignore[no-untyped-def]
    """The layer's e0 from ``count`` partial maxima of ``need``'s bits at ``tops``."""
    i = tl.arange(0, CP)
    best = tl.full([], 0, tl.int64)
    for i0 in range(0, count, CP):
        best = tl.maximum(best, tl.max(tl.load(tops + i0 + i, mask=i0 + i < count, other=0),
                                       axis=0))
    return base_exponent(best)


@triton.jit(do_not_specialize=GEOMETRY)
def encode_codes(k_ptr, v_ptr, page_stride, out_ptr, out_stride,  # type: ignore[no-untyped-def]
                 scr_f, scr_stride, top_ptr, top_stride, m_ptr, m_stride, mant_ptr, q8_ptr,
                 q8_stride, o_oidx, o_exps, o_oraw, o_kb, o_vb, o_kq, o_vq,
                 L, T, S, H, D, n_out, Gk, nk, Gv, nv,
                 KIND: tl.constexpr, BITS: tl.constexpr, GB: tl.constexpr, VEC: tl.constexpr,
                 BT: tl.constexpr, BC: tl.constexpr, VR: tl.constexpr, CP: tl.constexpr):
    """The second pass (see the module docstring), with :func:`encode_bounds`'s scratch;
    ``m_ptr``: the int32 minima of every group, K's ``[L, nk, C']`` then V's ``[L, T', nv]``
    per page (``m_stride`` a page). ``BITS``: 8, 4, or 0 for int4a's first step: K's int8
    codes into ``q8_ptr`` (``[L, T', C']`` a page, ``q8_stride`` apart) for the key bit
    allocation to repack, V's int8 codes requantized to int4 (``(q8 + 8) // 17``, as the
    int8 -> int4a transcode does) straight into the int4a payload."""
    kv, part, n, layer, D, out, sf, tops = _program(L, D, out_ptr, out_stride, scr_f,
                                                    scr_stride, top_ptr, top_stride, VEC)
    HD = H * D
    Tq = T - S
    Ck = H * (D - n_out)
    exps = (out + o_exps).to(tl.pointer_type(tl.int16))
    chunks = tl.maximum(tl.cdiv(Ck, BC), 1)  # one even without kept channels: e0 is written
    if kv == 0:
        if part < nk * chunks:
            x0 = k_ptr + n * aligned(page_stride, VEC) + (layer * T + S) * HD
            e0 = _layer_e0(tops, H, CP)
            if part == 0:
                tl.store(exps + 2 * layer, e0.to(tl.int16))
            oidx = (out + o_oidx).to(tl.pointer_type(tl.int16)) + layer * H * n_out
            g = part // chunks
            m_out = m_ptr + n * m_stride + (layer * nk + g) * Ck
            if BITS == 0:
                kq = q8_ptr + n * q8_stride
            else:
                kq = out + o_kq
            _k_codes(x0, out, kq, sf + g * HD, sf + (nk + g) * HD, m_out, mant_ptr, e0, oidx,
                     o_kb + (layer * nk + g) * Ck, layer, g, part % chunks, Tq, HD, D, n_out,
                     Ck, Gk, KIND, BITS, BT, BC)
            if part == 0:
                oraw = (out + o_oraw).to(k_ptr.dtype) + layer * Tq * H * n_out
                move_outliers(x0, oraw, oidx, Tq, HD, D, n_out, True, BT, BC)
    elif part * VR < Tq:
        x0 = v_ptr + n * aligned(page_stride, VEC) + (layer * T + S) * HD
        e0 = _layer_e0(tops, tl.cdiv(Tq, VR), CP)
        if part == 0:
            tl.store(exps + 2 * layer + 1, e0.to(tl.int16))
        vlo = sf + 2 * nk * HD
        m_out = m_ptr + n * m_stride + L * nk * Ck + layer * Tq * nv
        _v_codes(x0, out, vlo, vlo + Tq * nv, m_out, mant_ptr, e0, o_vb + layer * Tq * nv,
                 o_vq, layer, part, Tq, HD, Gv, nv, KIND, BITS, GB, VEC, VR)


@triton.jit
def _grid(mn, mx, e0, mant_ptr):  # type: ignore[no-untyped-def]
    """A group's scale code (int32), minimum (int32), ``1 / s`` and ``m`` (float32) from its
    float32 bounds, as the CPU kernels choose them."""
    b = scale_code(need_of(mn, mx), e0, mant_ptr)
    s = scale_f64(b, e0, mant_ptr)
    m = minimum_of(mn, s)
    return b, m, tl.math.div_rn(1.0, s.to(tl.float32)), m.to(tl.float32)


@triton.jit
def _k_codes(x0, out, kq, kmn, kmx, m_out, mant_ptr, e0, oidx,  # type: ignore[no-untyped-def]
             o_kb, layer, g, chunk, Tq, HD, D, n_out, Ck, Gk,
             KIND: tl.constexpr, BITS: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """Token group ``g`` of a layer of K, kept positions ``[chunk BC, chunk BC + BC)``:
    their grid, then their codes into the ``[L, T', row]`` codes at ``kq`` (int8 for
    ``BITS`` 8 and 0) (``kmn``/``kmx``: the group's bounds per channel)."""
    t_lo = g * Gk
    t_hi = tl.minimum(t_lo + Gk, Tq)
    if BITS != 4:
        p = chunk * BC + tl.arange(0, BC)
        pm = p < Ck
        c = kept_channel(oidx, p, pm, D, n_out)
        b, m, inv, mf = _grid(tl.load(kmn + c, mask=pm, other=0.0),
                              tl.load(kmx + c, mask=pm, other=0.0), e0, mant_ptr)
        tl.store(out + o_kb + p, b.to(tl.uint8), mask=pm)
        tl.store(m_out + p, m, mask=pm)
        kq = kq + layer * Tq * Ck
        for t0 in range(t_lo, t_hi, BT):
            rows = t0 + tl.arange(0, BT)
            m2 = (rows < t_hi)[:, None] & pm[None, :]
            x = load_f32(x0 + rows[:, None] * HD + c[None, :], m2, KIND)
            q = code_of(x, inv[None, :], mf[None, :], 8)
            tl.store(kq + rows[:, None] * Ck + p[None, :], q.to(tl.uint8), mask=m2)
    else:  # two positions a byte: lanes are the chunk's bytes
        rb = (Ck + 1) // 2
        j = chunk * (BC // 2) + tl.arange(0, BC // 2)
        p_lo = 2 * j
        p_hi = 2 * j + 1
        pm_lo = p_lo < Ck
        pm_hi = p_hi < Ck
        c_lo = kept_channel(oidx, p_lo, pm_lo, D, n_out)
        c_hi = kept_channel(oidx, p_hi, pm_hi, D, n_out)
        b_lo, m_lo, inv_lo, mf_lo = _grid(tl.load(kmn + c_lo, mask=pm_lo, other=0.0),
                                          tl.load(kmx + c_lo, mask=pm_lo, other=0.0), e0,
                                          mant_ptr)
        b_hi, m_hi, inv_hi, mf_hi = _grid(tl.load(kmn + c_hi, mask=pm_hi, other=0.0),
                                          tl.load(kmx + c_hi, mask=pm_hi, other=0.0), e0,
                                          mant_ptr)
        tl.store(out + o_kb + p_lo, b_lo.to(tl.uint8), mask=pm_lo)
        tl.store(out + o_kb + p_hi, b_hi.to(tl.uint8), mask=pm_hi)
        tl.store(m_out + p_lo, m_lo, mask=pm_lo)
        tl.store(m_out + p_hi, m_hi, mask=pm_hi)
        kq = kq + layer * Tq * rb
        for t0 in range(t_lo, t_hi, BT):
            rows = t0 + tl.arange(0, BT)
            rm = rows < t_hi
            a_lo = rm[:, None] & pm_lo[None, :]
            a_hi = rm[:, None] & pm_hi[None, :]
            x_lo = load_f32(x0 + rows[:, None] * HD + c_lo[None, :], a_lo, KIND)
            x_hi = load_f32(x0 + rows[:, None] * HD + c_hi[None, :], a_hi, KIND)
            q_lo = code_of(x_lo, inv_lo[None, :], mf_lo[None, :], 4)
            q_hi = tl.where(a_hi, code_of(x_hi, inv_hi[None, :], mf_hi[None, :], 4), 0)
            tl.store(kq + rows[:, None] * rb + j[None, :], (q_lo | (q_hi << 4)).to(tl.uint8),
                     mask=a_lo)


@triton.jit
def _v_codes(x0, out, vlo, vhi, m_out, mant_ptr, e0, o_vb, o_vq,  # type: ignore[no-untyped-def]
             layer, part, Tq, HD, Gv, nv, KIND: tl.constexpr, BITS: tl.constexpr,
             GB: tl.constexpr, VEC: tl.constexpr, VR: tl.constexpr):
    """Token rows ``[part VR, part VR + VR)`` of a layer of V, group by group: each row's
    grid, then the group's codes. int4 needs groups of an even length (or one group a row):
    a byte never holds codes of two groups."""
    rows = part * VR + tl.arange(0, VR)
    rm = rows < Tq
    Gv = aligned(Gv, VEC)
    for g in range(0, nv):
        i = rows * nv + g
        b, m, inv, mf = _grid(tl.load(vlo + i, mask=rm, other=0.0),
                              tl.load(vhi + i, mask=rm, other=0.0), e0, mant_ptr)
        tl.store(out + o_vb + i, b.to(tl.uint8), mask=rm)
        tl.store(m_out + i, m, mask=rm)
        c_hi = tl.minimum(g * Gv + Gv, HD)
        if BITS == 8:
            vq = out + aligned(o_vq, 8) + layer * Tq * HD
            for c0 in range(g * Gv, c_hi, GB):
                cols = c0 + tl.arange(0, GB)
                m2 = rm[:, None] & (cols < c_hi)[None, :]
                x = load_f32(x0 + rows[:, None] * HD + cols[None, :], m2, KIND)
                q = code_of(x, inv[:, None], mf[:, None], 8)
                tl.store(vq + rows[:, None] * HD + cols[None, :], q.to(tl.uint8), mask=m2)
        else:
            rb = (HD + 1) // 2
            vq = out + o_vq + layer * Tq * rb
            for c0 in range(g * Gv, c_hi, GB):
                j = c0 // 2 + tl.arange(0, GB // 2)
                a_lo = rm[:, None] & (2 * j < c_hi)[None, :]
                a_hi = rm[:, None] & (2 * j + 1 < c_hi)[None, :]
                x_lo = load_f32(x0 + rows[:, None] * HD + 2 * j[None, :], a_lo, KIND)
                x_hi = load_f32(x0 + rows[:, None] * HD + 2 * j[None, :] + 1, a_hi, KIND)
                if BITS == 4:
                    q_lo = code_of(x_lo, inv[:, None], mf[:, None], 4)
                    q_hi = code_of(x_hi, inv[:, None], mf[:, None], 4)
                else:  # int4a: the int8 codes, requantized as the transcode does
                    q_lo = (code_of(x_lo, inv[:, None], mf[:, None], 8) + 8) // 17
                    q_hi = (code_of(x_hi, inv[:, None], mf[:, None], 8) + 8) // 17
                q_hi = tl.where(a_hi, q_hi, 0)
                tl.store(vq + rows[:, None] * rb + j[None, :], (q_lo | (q_hi << 4)).to(tl.uint8),
                         mask=a_lo)


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
