"""Triton kernel that decodes int8, int4 and int4a payloads into pages on the device.

A grid of ``(pages * L, 2, chunks)``: program ``(page and layer, K or V, chunk)`` writes one
chunk of its layer of K (``KC`` quantized channels, every token) or of V (``VR`` token rows,
every channel) straight into the page; chunk 0 also copies the layer's sinks and, for K, its
outlier channels. Codes become values on the grid ``(m + step q) s`` (an exact integer times
the scale, one rounding, then one more to the page dtype: the CPU kernels'
:func:`kvtier.codecs.cpu.rows.dequant_store`).

A group's scale and minimum are read once for the tile of codes that shares them (K: per
channel, for the group's token rows; V: per token row, for the group's channels), not per
code. K's codes are written to the channels their kept positions stand for (``i +`` the
outliers of the head at or below it, from the layer's outlier indices); int4a's are read at
their bit offsets (the exclusive prefix sum of the layer's key bit map) and mapped back to the
int8 codes they stand for, ``round(q 255 / (2^b - 1))``, so int4a decodes in one pass, without
the int8 payload the CPU path builds.

``VEC`` is the launcher's promise that the page's row width ``H D`` and V's group length are
multiples of ``VEC`` elements (and ``VEC`` elements at most 16 bytes): V's rows are then
stored ``VEC`` elements to an instruction (:func:`~kvtier.codecs.cuda.numerics.aligned`).

The payload must have passed the host checks first (outlier indices and exponents in range,
the key bit map's widths and sums): the kernel indexes with them unchecked.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kvtier.codecs.cuda.numerics import (
    aligned, copy_bytes, kept_channel, m12_at, move_outliers, scale_f32, store_f32,
)

GEOMETRY = [  # every integer argument (see kvtier.codecs.cuda.encode.GEOMETRY)
    "src_stride", "page_stride", "o_oidx", "o_exps", "o_sink", "o_oraw", "o_kb", "o_km", "o_vb",
    "o_vm", "o_kbits", "o_kq", "o_vq", "L", "T", "S", "H", "D", "n_out", "Gk", "nk", "Gv", "nv",
    "krb"]


@triton.jit(do_not_specialize=GEOMETRY)
def decode_page(src_ptr, src_stride, k_ptr, v_ptr, page_stride,  # type: ignore[no-untyped-def]
                mant_ptr, o_oidx, o_exps, o_sink, o_oraw, o_kb, o_km, o_vb, o_vm, o_kbits,
                o_kq, o_vq, L, T, S, H, D, n_out, Gk, nk, Gv, nv, krb,
                KIND: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr,
                VEC: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, KC: tl.constexpr,
                VR: tl.constexpr, GB: tl.constexpr):
    """Decode chunk ``program_id(2)`` of layer ``program_id(0) % L`` of payload
    ``program_id(0) // L``: of K when ``program_id(1)`` is 0, of V when 1. ``KBITS``: 8, 4,
    or 0 for int4a's allocated bits."""
    pid = tl.program_id(0)
    kv = tl.program_id(1)
    chunk = tl.program_id(2)
    n = (pid // L).to(tl.int64)
    layer = pid % L
    HD = aligned(H * D, VEC)
    Tq = T - S
    blob = src_ptr + n * aligned(src_stride, 8)
    if kv == 0:
        dst = k_ptr + n * aligned(page_stride, VEC) + layer * T * HD
    else:
        dst = v_ptr + n * aligned(page_stride, VEC) + layer * T * HD
    if chunk == 0:
        sink = (blob + o_sink).to(k_ptr.dtype) + (kv * L + layer) * S * HD
        copy_bytes(sink, dst, S * HD, 1024)
    if Tq > 0:
        x0 = dst + S * HD
        e0 = tl.load((blob + o_exps).to(tl.pointer_type(tl.int16)) + 2 * layer + kv)
        e0 = e0.to(tl.int32)
        if kv == 0:
            oidx = (blob + o_oidx).to(tl.pointer_type(tl.int16)) + layer * H * n_out
            _decode_k(blob, x0, mant_ptr, e0, oidx, o_kb, o_km, o_kbits, o_kq, layer, Tq, H,
                      D, n_out, Gk, nk, krb, chunk, KIND, KBITS, BT, KC)
            if chunk == 0:
                oraw = (blob + o_oraw).to(k_ptr.dtype) + layer * Tq * H * n_out
                move_outliers(x0, oraw, oidx, Tq, HD, D, n_out, False, BT, BC)
        else:
            _decode_v(blob, x0, mant_ptr, e0, o_vb, o_vm, o_vq, layer, Tq, HD, Gv, nv, chunk,
                      KIND, VBITS, VEC, VR, GB)


@triton.jit
def _decode_k(blob, x0, mant_ptr, e0, oidx, o_kb, o_km,  # type: ignore[no-untyped-def]
              o_kbits, o_kq, layer, Tq, H, D, n_out, Gk, nk, krb, chunk,
              KIND: tl.constexpr, KBITS: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """K's kept positions ``[chunk BC, chunk BC + BC)`` of every token."""
    HD = H * D
    Ck = H * (D - n_out)
    p = chunk * BC + tl.arange(0, BC)
    pm = p < Ck
    c = kept_channel(oidx, p, pm, D, n_out)
    if KBITS == 0:  # each position's bit offset in a row: the bits of the positions before it
        kbits = blob + o_kbits + layer * ((Ck + 1) // 2)
        carry = tl.full([], 0, tl.int32)
        for q0 in range(0, chunk * BC, BC):
            qq = q0 + tl.arange(0, BC)
            byte = tl.load(kbits + qq // 2, mask=qq < Ck, other=0).to(tl.int32)
            carry += tl.sum(tl.where(qq < Ck, tl.where(qq % 2 == 0, byte & 15, byte >> 4), 0),
                            axis=0)
        byte = tl.load(kbits + p // 2, mask=pm, other=0).to(tl.int32)
        w = tl.where(pm, tl.where(p % 2 == 0, byte & 15, byte >> 4), 2)
        off = carry + tl.cumsum(tl.where(pm, w, 0), axis=0) - tl.where(pm, w, 0)
        at = (off >> 3)[None, :]
        sh = (off & 7)[None, :]
        lv = ((1 << w) - 1)[None, :]
        # q8 = (510 qb + lv) // (2 lv) without a division a code: a multiply by each
        # position's ceil(2^32 / (2 lv)) and a shift, exact for every numerator below 2^17
        # (the largest is 510 * 255 + 255)
        d2 = 2 * lv.to(tl.int64)
        inv2lv = (4294967296 + d2 - 1) // d2
    kb = blob + o_kb + layer * nk * Ck
    for g in range(0, nk):
        # the group's scale and minimum of each position, for all its token rows
        s = scale_f32(tl.load(kb + g * Ck + p, mask=pm, other=0).to(tl.int32), e0, mant_ptr)
        m = m12_at(blob + o_km, (layer * nk + g) * Ck + p, pm)
        t_hi = tl.minimum(g * Gk + Gk, Tq)
        for t0 in range(g * Gk, t_hi, BT):
            rows = t0 + tl.arange(0, BT)
            m2 = (rows < t_hi)[:, None] & pm[None, :]
            if KBITS == 8:
                q = tl.load(blob + o_kq + (layer * Tq + rows)[:, None] * Ck + p[None, :],
                            mask=m2, other=0).to(tl.int32)
            elif KBITS == 4:
                byte = tl.load(blob + o_kq + (layer * Tq + rows)[:, None] * krb
                               + (p // 2)[None, :], mask=m2, other=0).to(tl.int32)
                q = 17 * tl.where((p % 2 == 0)[None, :], byte & 15, byte >> 4)
            else:
                row = blob + o_kq + (layer * Tq + rows)[:, None] * krb
                lo = tl.load(row + at, mask=m2, other=0).to(tl.int32)
                hi = tl.load(row + at + 1, mask=m2 & (sh + w[None, :] > 8), other=0).to(tl.int32)
                qb = ((lo | (hi << 8)) >> sh) & lv
                q = (((510 * qb + lv).to(tl.int64) * inv2lv) >> 32).to(tl.int32)
            store_f32(x0 + rows[:, None] * HD + c[None, :],
                      (m[None, :] + q).to(tl.float32) * s[None, :], m2, KIND)


@triton.jit
def _decode_v(blob, x0, mant_ptr, e0, o_vb, o_vm, o_vq, layer,  # type: ignore[no-untyped-def]
              Tq, HD, Gv, nv, chunk, KIND: tl.constexpr, VBITS: tl.constexpr,
              VEC: tl.constexpr, VR: tl.constexpr, GB: tl.constexpr):
    """V's token rows ``[chunk VR, chunk VR + VR)``, group by group."""
    rows = chunk * VR + tl.arange(0, VR)
    rm = rows < Tq
    r = layer * Tq + rows
    Gv = aligned(Gv, VEC)
    rb = (HD + 1) // 2
    vq = blob + aligned(o_vq, 8)
    for g in range(0, nv):
        # each row's scale and minimum of this group, for all its channels
        s = scale_f32(tl.load(blob + o_vb + r * nv + g, mask=rm, other=0).to(tl.int32), e0,
                      mant_ptr)
        m = m12_at(blob + o_vm, r * nv + g, rm)
        c_hi = tl.minimum(g * Gv + Gv, HD)
        for c0 in range(g * Gv, c_hi, GB):
            cols = c0 + tl.arange(0, GB)
            m2 = rm[:, None] & (cols < c_hi)[None, :]
            if VBITS == 8:
                q = tl.load(vq + r[:, None] * HD + cols[None, :], mask=m2, other=0).to(tl.int32)
            else:
                byte = tl.load(vq + r[:, None] * rb + (cols // 2)[None, :], mask=m2,
                               other=0).to(tl.int32)
                q = 17 * tl.where((cols % 2 == 0)[None, :], byte & 15, byte >> 4)
            store_f32(x0 + rows[:, None] * HD + cols[None, :],
                      (m[:, None] + q).to(tl.float32) * s[:, None], m2, KIND)
