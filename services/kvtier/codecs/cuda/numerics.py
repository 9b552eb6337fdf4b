"""Triton helpers shared by the device codec kernels: page elements to and from float32, the
grid of a group, code rounding.

Every helper reproduces the CPU kernels' arithmetic (:mod:`kvtier.codecs.cpu.rows`) operation
for operation, so the device blobs are the CPU blobs byte for byte:

* grid selection in float64 (``need``, the scale code from the exponent and mantissa bits of
  ``need``, ``m = floor(min / s)``), float64 division being IEEE ``div.rn.f64`` on the device;
* codes in float32, multiply then subtract, each rounded: the kernels are launched with
  ``enable_fp_fusion=False`` so that the compiler never contracts ``x * inv - m`` into one
  fused multiply-add, which rounds once and gives other codes; ``1 / s`` with
  :func:`triton.language.math.div_rn` (the default float32 division is approximate);
* round half to even by the ``1.5 * 2**23`` trick (adds only, exact for ``|y| < 2**22``, and
  outside it both paths clamp alike), which needs no libdevice call and so runs in Triton's
  interpreter (``TRITON_INTERPRET=1``) too, where the CPU tests run these very kernels;
* bfloat16 as bits (float32 widening by a shift; narrowing rounds to nearest even on the bits,
  as torch does), float16 through the hardware conversion (round to nearest even).

Page elements are loaded through a pointer of the page dtype, except bfloat16 pages, which
the launcher passes as int16 (``KIND`` 1): Triton's interpreter truncates float32 to bfloat16
instead of rounding, and the bit arithmetic is the same on every backend.
"""

from __future__ import annotations

import triton
import triton.language as tl

# globals a kernel reads must be Triton constexprs
RINT_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: y + it - it rounds float32 y half to even
R17 = tl.constexpr(0.05882352963089943)  # float32(1) / float32(17), exactly (a float32 value)


@triton.jit
def aligned(x, A: tl.constexpr):  # type: ignore[no-untyped-def]
    """``x``, which the launcher promises is a multiple of ``A``, written so that the compiler
    knows it too (``tl.multiple_of`` on an argument does not reach the divisibility analysis):
    offsets built from it let loads and stores move ``A`` elements an instruction."""
    return (x // A) * A


@triton.jit
def rint(y):  # type: ignore[no-untyped-def]
    """float32 ``y`` rounded half to even (for ``|y| < 2**22``; beyond, a value as large)."""
    return (y + RINT_MAGIC) - RINT_MAGIC


@triton.jit
def load_f32(ptr, mask, KIND: tl.constexpr):  # type: ignore[no-untyped-def]
    """Page elements at ``ptr`` (dtype ``KIND``: 0 float16, 1 bfloat16 as int16, 2 float32)
    as float32, exactly."""
    if KIND == 1:
        w = tl.load(ptr, mask=mask, other=0).to(tl.uint16, bitcast=True).to(tl.uint32)
        return (w << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptr, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def store_f32(ptr, x, mask, KIND: tl.constexpr):  # type: ignore[no-untyped-def]
    """Store float32 ``x`` as page elements (dtype ``KIND``), rounded to nearest even."""
    if KIND == 1:
        u = x.to(tl.uint32, bitcast=True)
        u = u + 0x7FFF + ((u >> 16) & 1)
        tl.store(ptr, (u >> 16).to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    elif KIND == 0:
        tl.store(ptr, x.to(tl.float16), mask=mask)
    else:
        tl.store(ptr, x, mask=mask)


@triton.jit
def pow2_f64(e):  # type: ignore[no-untyped-def]
    """Exactly ``2.0 ** e`` (float64) for integer ``e`` in the normal range."""
    return ((e.to(tl.int64) + 1023) << 52).to(tl.float64, bitcast=True)


@triton.jit
def pow2_f32(e):  # type: ignore[no-untyped-def]
    """Exactly ``2.0 ** e`` (float32) for integer ``e`` in -126..127."""
    return ((e.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def need_of(mn, mx):  # type: ignore[no-untyped-def]
    """The smallest scale a group with float32 bounds ``mn``/``mx`` may use (float64):
    ``max((mx - mn) / 254, |mn| / 2047)`` as :func:`kvtier.codecs.grid.need`."""
    lo = mn.to(tl.float64)
    a = (mx.to(tl.float64) - lo) / 254.0
    b = tl.abs(lo) / 2047.0
    return tl.where(a > b, a, b)


@triton.jit
def base_exponent(top_bits):  # type: ignore[no-untyped-def]
    """``e0`` of a layer from the bits of its largest ``need`` (int64, >= 0): frexp's exponent
    less 15, clamped to -126..111 (0.0 counts as exponent 0)."""
    e = tl.where(top_bits == 0, 0, (top_bits >> 52) - 1022) - 15
    return tl.minimum(tl.maximum(e, -126), 111)


@triton.jit
def scale_code(need, e0, mant_ptr):  # type: ignore[no-untyped-def]
    """The smallest ``b`` with ``table[b] >= need`` (clamped to 0..255), int32, as
    :func:`kvtier.codecs.cpu.rows.choose` finds it: from ``need``'s exponent and the count of
    table mantissas below its mantissa."""
    bits = need.to(tl.int64, bitcast=True)
    e = (bits >> 52) - 1023
    m = ((bits & 0xFFFFFFFFFFFFF) | 0x3FF0000000000000).to(tl.float64, bitcast=True)
    j = tl.zeros_like(e)
    for k in tl.static_range(16):
        j += (tl.load(mant_ptr + k) < m).to(tl.int64)
    return tl.minimum(tl.maximum(16 * (e - e0) + j, 0), 255).to(tl.int32)


@triton.jit
def scale_f64(b, e0, mant_ptr):  # type: ignore[no-untyped-def]
    """``table[b]`` in float64 (a float32 value): ``mant[b % 16] * 2 ** (e0 + b // 16)``."""
    return tl.load(mant_ptr + (b & 15)) * pow2_f64(e0 + (b >> 4))


@triton.jit
def scale_f32(b, e0, mant_ptr):  # type: ignore[no-untyped-def]
    """``table[b]`` as float32 (the product is exact: a float32 mantissa times a power of
    two in the normal range)."""
    return tl.load(mant_ptr + (b & 15)).to(tl.float32) * pow2_f32(e0 + (b >> 4))


@triton.jit
def minimum_of(mn, s):  # type: ignore[no-untyped-def]
    """The group minimum in scale units, ``clamp(floor(mn / s), -2048, 2047)`` (int32)."""
    m = tl.floor(mn.to(tl.float64) / s)
    return tl.minimum(tl.maximum(m, -2048.0), 2047.0).to(tl.int32)


@triton.jit
def code_of(x, inv, mf, BITS: tl.constexpr):  # type: ignore[no-untyped-def]
    """The code (int32) of float32 ``x`` on the grid ``(inv = 1 / s, mf = m)``."""
    y = x * inv - mf
    if BITS == 8:
        r = rint(y)
        return tl.minimum(tl.maximum(r, 0.0), 255.0).to(tl.int32)
    else:
        r = rint(y * R17)
        return tl.minimum(tl.maximum(r, 0.0), 15.0).to(tl.int32)


@triton.jit
def m12_at(base_ptr, i, mask):  # type: ignore[no-untyped-def]
    """The signed 12-bit minimum number ``i`` of a packed m12 section at ``base_ptr`` (int32;
    see :mod:`kvtier.codecs.pack`); 0 where ``mask`` is false."""
    p = 3 * (i // 2)
    odd = (i % 2) == 1
    lo = tl.load(base_ptr + p + odd.to(tl.int32), mask=mask, other=0).to(tl.int32)
    hi = tl.load(base_ptr + p + 2, mask=mask, other=0).to(tl.int32)
    u = lo | (tl.where(odd, hi >> 4, hi & 0x0F) << 8)
    return tl.where(u >= 2048, u - 4096, u)


@triton.jit
def page_ptr(p, KIND: tl.constexpr):  # type: ignore[no-untyped-def]
    """Byte pointer ``p`` as a pointer to page elements of ``KIND`` (bfloat16 as int16)."""
    if KIND == 0:
        return p.to(tl.pointer_type(tl.float16))
    elif KIND == 1:
        return p.to(tl.pointer_type(tl.int16))
    else:
        return p.to(tl.pointer_type(tl.float32))


@triton.jit
def copy_bytes(src, dst, n, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    """``dst[:n] = src[:n]`` (elements of the pointers' type), BLOCK at a time."""
    for i0 in range(0, n, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        tl.store(dst + i, tl.load(src + i, mask=i < n), mask=i < n)


@triton.jit
def kept_channel(oidx, p, pm, D, n_out):  # type: ignore[no-untyped-def]
    """The flat channel ``h D + d`` (int32) that kept position ``p`` (``[n]`` lanes, of a
    layer's ``H (D - n_out)``) stands for, from the layer's outlier indices (int16
    ``[H, n_out]``, ascending per head): position ``i`` of head ``h`` is channel
    ``i + #{j : oidx[h, j] - j <= i}``, since outlier ``j`` has ``oidx[h, j] - j`` kept
    channels below it."""
    Dk = tl.maximum(D - n_out, 1)
    h = p // Dk
    i = p - h * Dk
    d = i
    for j in range(0, n_out):
        o = tl.load(oidx + h * n_out + j, mask=pm, other=0).to(tl.int32)
        d += tl.where(o - j <= i, 1, 0)
    return h * D + d


@triton.jit
def move_outliers(x0, oraw, oidx, Tq, HD, D, n_out,  # type: ignore[no-untyped-def]
                  TO_RAW: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """Copy the outlier channels of ``Tq`` token rows of ``HD`` elements at ``x0`` (the
    layer's ``oidx``, int16 ``[H, n_out]``) to the rows of ``H n_out`` at ``oraw``
    (``TO_RAW``), or back."""
    HO = (HD // tl.maximum(D, 1)) * n_out
    for o0 in range(0, HO, BC):
        o = o0 + tl.arange(0, BC)
        om = o < HO
        c = (o // tl.maximum(n_out, 1)) * D + tl.load(oidx + o, mask=om, other=0).to(tl.int32)
        for t0 in range(0, Tq, BT):
            rows = t0 + tl.arange(0, BT)
            m2 = (rows < Tq)[:, None] & om[None, :]
            at_page = x0 + rows[:, None] * HD + c[None, :]
            at_raw = oraw + rows[:, None] * HO + o[None, :]
            if TO_RAW:
                tl.store(at_raw, tl.load(at_page, mask=m2), mask=m2)
            else:
                tl.store(at_page, tl.load(at_raw, mask=m2), mask=m2)
