"""Triton kernel that decodes int8, int4 and int4a payloads into pages on the device.

One program per (page, layer, K or V), a grid of ``(pages * L, 2)``, each writing its layer
of K (or V) straight into the page: sinks copied, codes turned into values on the grid
``(m + step q) s`` (an exact integer times the scale, one rounding, then one more to the page
dtype: the CPU kernels' :func:`kvtier.codecs.cpu.rows.dequant_store`), outlier channels copied.
K's codes are read per kept position through the map the layer's outlier indices give; int4a's
are read at their bit offsets (the exclusive prefix sum of the layer's key bit map) and mapped
back to the int8 codes they stand for, ``round(q 255 / (2^b - 1))``, so int4a decodes in one
pass, without the int8 payload the CPU path builds.

The payload must have passed the host checks first (outlier indices and exponents in range,
the key bit map's widths and sums): the kernel indexes with them unchecked.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kvtier.codecs.cuda.numerics import (
    copy_bytes, kept_map, m12_at, move_outliers, scale_f32, store_f32,
)

GEOMETRY = [  # every integer argument (see kvtier.codecs.cuda.encode.GEOMETRY)
    "src_stride", "page_stride", "scr_stride", "o_oidx", "o_exps", "o_sink", "o_oraw", "o_kb",
    "o_km", "o_vb", "o_vm", "o_kbits", "o_kq", "o_vq", "L", "T", "S", "H", "D", "n_out", "Gk",
    "nk", "Gv", "nv", "krb"]


@triton.jit(do_not_specialize=GEOMETRY)
def decode_page(src_ptr, src_stride, k_ptr, v_ptr, page_stride,  # type: ignore[no-untyped-def]
                scr_i, scr_stride, mant_ptr,
                o_oidx, o_exps, o_sink, o_oraw, o_kb, o_km, o_vb, o_vm, o_kbits, o_kq, o_vq,
                L, T, S, H, D, n_out, Gk, nk, Gv, nv, krb,
                KIND: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr,
                DP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """Decode layer ``program_id(0) % L`` of payload ``program_id(0) // L``: K when
    ``program_id(1)`` is 0, V when 1. ``KBITS``: 8, 4, or 0 for int4a's allocated bits."""
    pid = tl.program_id(0)
    kv = tl.program_id(1)
    n = (pid // L).to(tl.int64)
    layer = pid % L
    HD = H * D
    Tq = T - S
    blob = src_ptr + n * src_stride
    if kv == 0:
        dst = k_ptr + n * page_stride + layer * T * HD
    else:
        dst = v_ptr + n * page_stride + layer * T * HD
    sink = (blob + o_sink).to(k_ptr.dtype) + (kv * L + layer) * S * HD
    copy_bytes(sink, dst, S * HD, 1024)
    if Tq > 0:
        x0 = dst + S * HD
        e0 = tl.load((blob + o_exps).to(tl.pointer_type(tl.int16)) + 2 * layer + kv)
        e0 = e0.to(tl.int32)
        if kv == 0:
            _decode_k(blob, x0, scr_i + pid.to(tl.int64) * scr_stride, mant_ptr, e0, k_ptr,
                      o_oidx, o_oraw, o_kb, o_km, o_kbits, o_kq, layer, Tq, H, D, n_out, Gk,
                      nk, krb, KIND, KBITS, DP, BT, BC)
        else:
            _decode_v(blob, x0, mant_ptr, e0, o_vb, o_vm, o_vq, layer, Tq, HD, Gv, nv,
                      KIND, VBITS, BT, BC)


@triton.jit
def _decode_k(blob, x0, si, mant_ptr, e0, k_ptr, o_oidx, o_oraw,  # type: ignore[no-untyped-def]
              o_kb, o_km, o_kbits, o_kq, layer, Tq, H, D, n_out, Gk, nk, krb,
              KIND: tl.constexpr, KBITS: tl.constexpr, DP: tl.constexpr,
              BT: tl.constexpr, BC: tl.constexpr):
    HD = H * D
    Ck = H * (D - n_out)
    # scratch (int32): [C'] kept position -> channel, [H n_out] outlier channels,
    # int4a: [C'] bit offset in the row, [C'] bits
    kch = si
    och = si + Ck
    koff = och + H * n_out
    kw = koff + Ck
    kept_map((blob + o_oidx).to(tl.pointer_type(tl.int16)) + layer * H * n_out, kch, och,
             H, D, n_out, DP)
    if KBITS == 0:
        kbits = blob + o_kbits + layer * ((Ck + 1) // 2)
        carry = tl.full([], 0, tl.int32)
        for p0 in range(0, Ck, BC):
            p = p0 + tl.arange(0, BC)
            pm = p < Ck
            byte = tl.load(kbits + p // 2, mask=pm, other=0).to(tl.int32)
            w = tl.where(pm, tl.where(p % 2 == 0, byte & 15, byte >> 4), 0)
            incl = tl.cumsum(w, axis=0)
            tl.store(koff + p, carry + incl - w, mask=pm)
            tl.store(kw + p, w, mask=pm)
            carry += tl.sum(w, axis=0)
    tl.debug_barrier()
    kb = blob + o_kb + layer * nk * Ck
    km = blob + o_km
    for t0 in range(0, Tq, BT):
        rows = t0 + tl.arange(0, BT)
        rm = rows < Tq
        g = rows // Gk
        for p0 in range(0, Ck, BC):
            p = p0 + tl.arange(0, BC)
            pm = p < Ck
            m2 = rm[:, None] & pm[None, :]
            c = tl.load(kch + p, mask=pm, other=0)
            gi = g[:, None] * Ck + p[None, :]
            s = scale_f32(tl.load(kb + gi, mask=m2, other=0).to(tl.int32), e0, mant_ptr)
            m = m12_at(km, layer * nk * Ck + gi, m2)
            if KBITS == 8:
                q = tl.load(blob + o_kq + (layer * Tq + rows)[:, None] * Ck + p[None, :],
                            mask=m2, other=0).to(tl.int32)
            elif KBITS == 4:
                byte = tl.load(blob + o_kq + (layer * Tq + rows)[:, None] * krb
                               + (p // 2)[None, :], mask=m2, other=0).to(tl.int32)
                q = 17 * tl.where((p % 2 == 0)[None, :], byte & 15, byte >> 4)
            else:
                off = tl.load(koff + p, mask=pm, other=0)
                w = tl.load(kw + p, mask=pm, other=2)
                row = blob + o_kq + (layer * Tq + rows)[:, None] * krb
                at = (off >> 3)[None, :]
                sh = (off & 7)[None, :]
                lo = tl.load(row + at, mask=m2, other=0).to(tl.int32)
                hi = tl.load(row + at + 1, mask=m2 & (sh + w[None, :] > 8), other=0).to(tl.int32)
                lv = ((1 << w) - 1)[None, :]
                qb = ((lo | (hi << 8)) >> sh) & lv
                q = (510 * qb + lv) // (2 * lv)
            store_f32(x0 + rows[:, None] * HD + c[None, :], (m + q).to(tl.float32) * s, m2, KIND)
    oraw = (blob + o_oraw).to(k_ptr.dtype) + layer * Tq * H * n_out
    move_outliers(x0, oraw, och, Tq, HD, H * n_out, False, BT, BC)


@triton.jit
def _decode_v(blob, x0, mant_ptr, e0, o_vb, o_vm, o_vq, layer,  # type: ignore[no-untyped-def]
              Tq, HD, Gv, nv, KIND: tl.constexpr, VBITS: tl.constexpr,
              BT: tl.constexpr, BC: tl.constexpr):
    vb = blob + o_vb
    vm = blob + o_vm
    rb = (HD + 1) // 2
    for t0 in range(0, Tq, BT):
        rows = t0 + tl.arange(0, BT)
        rm = rows < Tq
        r = layer * Tq + rows
        for c0 in range(0, HD, BC):
            cols = c0 + tl.arange(0, BC)
            m2 = rm[:, None] & (cols < HD)[None, :]
            gi = r[:, None] * nv + (cols // Gv)[None, :]
            s = scale_f32(tl.load(vb + gi, mask=m2, other=0).to(tl.int32), e0, mant_ptr)
            m = m12_at(vm, gi, m2)
            if VBITS == 8:
                q = tl.load(blob + o_vq + r[:, None] * HD + cols[None, :], mask=m2,
                            other=0).to(tl.int32)
            else:
                byte = tl.load(blob + o_vq + r[:, None] * rb + (cols // 2)[None, :], mask=m2,
                               other=0).to(tl.int32)
                q = 17 * tl.where((cols % 2 == 0)[None, :], byte & 15, byte >> 4)
            store_f32(x0 + rows[:, None] * HD + cols[None, :], (m + q).to(tl.float32) * s, m2,
                      KIND)
