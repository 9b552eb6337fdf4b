"""Fused CPU kernels (numba): one pass per layer that converts, bounds, selects and quantizes.

The unfused torch code (:mod:`kvtier.codecs.reference`) walks the page about ten times
(cast to float32, abs, amax, amin, gather, divide, round, clamp, cast, pack ...), each pass a
trip to memory. These kernels work a layer at a time: the layer is read once, converted to
float32 into a scratch block that stays in cache, and every later step reads the scratch.
The arithmetic is the reference's step for step (float64 grid selection; float32 multiply
then subtract, round-half-even; float32 -> float16 and -> bfloat16 round-to-nearest-even),
so blobs and decoded tensors agree with the torch oracle bit for bit; the tests check it.

Page tensors are handled as flat ``uint16`` words whatever their dtype (a float32 element is
two words), which keeps one compiled specialization per kernel. Kernels release the GIL
(``nogil``) and spread layers over threads (``prange``). :func:`warmup` compiles them (or
loads them from numba's on-disk cache) so the first real request does not pay for it.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic
from numpy.typing import NDArray

from kvtier.codecs.blob import HEADER_SIZE
from kvtier.codecs.grid import E0_MAX, E0_MIN, M_MAX, M_MIN, MANTISSAS, STEPS
from kvtier.codecs.layout import Layout
from kvtier.types import Codec, Page

log = logging.getLogger(__name__)

KINDS = {"float16": 0, "bfloat16": 1, "float32": 2}
_MANT = np.array(MANTISSAS, dtype=np.float64)
_U16 = NDArray[np.uint16]


def available() -> bool:
    """The kernels run here (numba imported); callers fall back to torch otherwise."""
    return True


# --- bit-exact conversions (LLVM fptrunc/fpext: F16C instructions where the CPU has them) ---

def _f32_to_f16_typer(typingctx, x):  # type: ignore[no-untyped-def]
    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return types.uint16(types.float32), codegen


_f32_to_f16: Any = intrinsic(_f32_to_f16_typer)


def _f16_to_f32_typer(typingctx, x):  # type: ignore[no-untyped-def]
    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.uint16), codegen


_f16_to_f32: Any = intrinsic(_f16_to_f32_typer)


def _bits_to_f32_typer(typingctx, x):  # type: ignore[no-untyped-def]
    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


_bits_to_f32: Any = intrinsic(_bits_to_f32_typer)


def _f32_to_bits_typer(typingctx, x):  # type: ignore[no-untyped-def]
    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


_f32_to_bits: Any = intrinsic(_f32_to_bits_typer)


@njit(inline="always", nogil=True, cache=True)
def _load_row(src, off, n, kind, dst):  # type: ignore[no-untyped-def]
    """n elements of dtype ``kind`` starting at element ``off`` of word array ``src``."""
    if kind == 0:
        for i in range(n):
            dst[i] = _f16_to_f32(src[off + i])
    elif kind == 1:
        for i in range(n):
            dst[i] = _bits_to_f32(np.uint32(src[off + i]) << np.uint32(16))
    else:
        for i in range(n):
            lo = np.uint32(src[2 * (off + i)])
            hi = np.uint32(src[2 * (off + i) + 1])
            dst[i] = _bits_to_f32(lo | (hi << np.uint32(16)))


@njit(inline="always", nogil=True, cache=True)
def _store_row(vals, n, kind, dst, off):  # type: ignore[no-untyped-def]
    """Round float32 ``vals[:n]`` to dtype ``kind`` into word array ``dst`` at element ``off``."""
    if kind == 0:
        for i in range(n):
            dst[off + i] = _f32_to_f16(vals[i])
    elif kind == 1:
        for i in range(n):
            u = _f32_to_bits(vals[i])
            u = u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
            dst[off + i] = np.uint16(u >> np.uint32(16))
    else:
        for i in range(n):
            u = _f32_to_bits(vals[i])
            dst[2 * (off + i)] = np.uint16(u & np.uint32(0xFFFF))
            dst[2 * (off + i) + 1] = np.uint16(u >> np.uint32(16))


# --- the grid (see kvtier.codecs.grid), per layer ---------------------------------------

@njit(inline="always", nogil=True, cache=True)
def _table(e0, mant):  # type: ignore[no-untyped-def]
    tab = np.empty(256, np.float64)
    for b in range(256):
        tab[b] = mant[b % 16] * math.ldexp(1.0, e0 + b // 16)
    return tab


@njit(inline="always", nogil=True, cache=True)
def _choose(mn, mx, n, mant, b_out, m_out, inv, mf, s32):  # type: ignore[no-untyped-def]
    """Grid of ``n`` groups from float32 bounds; writes codes/minima, returns ``e0``."""
    need = np.empty(n, np.float64)
    top = 0.0
    for i in range(n):
        lo = np.float64(mn[i])
        nd = max((np.float64(mx[i]) - lo) / 254.0, abs(lo) / 2047.0)
        need[i] = nd
        top = max(top, nd)
    e0 = min(max(math.frexp(top)[1] - 15, -126), 111)
    tab = _table(e0, mant)
    for i in range(n):
        lo_b, hi_b = 0, 256
        while lo_b < hi_b:
            mid = (lo_b + hi_b) // 2
            if tab[mid] < need[i]:
                lo_b = mid + 1
            else:
                hi_b = mid
        b = min(lo_b, 255)
        s = tab[b]
        m = min(max(math.floor(np.float64(mn[i]) / s), -2048.0), 2047.0)
        b_out[i] = b
        m_out[i] = np.int32(m)
        s32[i] = np.float32(s)
        inv[i] = np.float32(1.0) / np.float32(s)
        mf[i] = np.float32(m)
    return e0


@njit(inline="always", nogil=True, cache=True)
def _put_m12(out, i, m):  # type: ignore[no-untyped-def]
    u = np.int64(m) & 0xFFF
    p = 3 * (i // 2)
    if i % 2 == 0:
        out[p] = np.uint8(u & 0xFF)
        out[p + 2] = np.uint8((out[p + 2] & 0xF0) | (u >> 8))
    else:
        out[p + 1] = np.uint8(u & 0xFF)
        out[p + 2] = np.uint8((out[p + 2] & 0x0F) | ((u >> 8) << 4))


@njit(inline="always", nogil=True, cache=True)
def _get_m12(src, i):  # type: ignore[no-untyped-def]
    p = 3 * (i // 2)
    if i % 2 == 0:
        u = np.int64(src[p]) | ((np.int64(src[p + 2]) & 0x0F) << 8)
    else:
        u = np.int64(src[p + 1]) | ((np.int64(src[p + 2]) >> 4) << 8)
    return u - 4096 if u >= 2048 else u


@njit(inline="always", nogil=True, cache=True)
def _quantize_row(x, idx, n, inv, mf, base, per, bits, q):  # type: ignore[no-untyped-def]
    """Codes of ``x[idx[j]]`` for j < n with grid entry ``base + j // per``."""
    for j in range(n):
        g = base + j // per
        y = x[idx[j]] * inv[g] - mf[g]
        if bits == 8:
            q[j] = np.uint8(min(max(np.rint(y), np.float32(0)), np.float32(255)))
        else:
            q[j] = np.uint8(min(max(np.rint(y / np.float32(17)), np.float32(0)),
                                np.float32(15)))


@njit(inline="always", nogil=True, cache=True)
def _put_codes(q, n, bits, out, off):  # type: ignore[no-untyped-def]
    if bits == 8:
        for j in range(n):
            out[off + j] = q[j]
    else:
        for j in range(n // 2):
            out[off + j] = q[2 * j] | (q[2 * j + 1] << np.uint8(4))
        if n % 2:
            out[off + n // 2] = q[n - 1]


@njit(inline="always", nogil=True, cache=True)
def _get_codes(src, off, n, bits, q):  # type: ignore[no-untyped-def]
    if bits == 8:
        for j in range(n):
            q[j] = src[off + j]
    else:
        for j in range(n // 2):
            byte = src[off + j]
            q[2 * j] = byte & np.uint8(0x0F)
            q[2 * j + 1] = byte >> np.uint8(4)
        if n % 2:
            q[n - 1] = src[off + n // 2] & np.uint8(0x0F)


# --- layer kernels ------------------------------------------------------------------------

@njit(nogil=True, cache=True)
def _encode_k(src, kind, L, T, S, H, D, n_out, Gk, bits, mant,  # type: ignore[no-untyped-def]
              oidx_out, oraw_out, kb, km, kq, exps):
    HD = H * D
    Tq = T - S
    Ck = H * (D - n_out)
    nk = (Tq + Gk - 1) // Gk
    w = 2 if kind == 2 else 1
    rb = Ck if bits == 8 else (Ck + 1) // 2
    ng = nk * Ck
    m_all = np.empty(L * ng, np.int32)
    X = np.empty((Tq, HD), np.float32)
    q = np.empty(Ck, np.uint8)
    for layer in range(L):
        amax = np.zeros(HD, np.float32)
        gmn = np.full((nk, HD), np.inf, np.float32)
        gmx = np.full((nk, HD), -np.inf, np.float32)
        for t in range(Tq):
            row = X[t]
            _load_row(src, (layer * T + S + t) * HD, HD, kind, row)
            mnr = gmn[t // Gk]
            mxr = gmx[t // Gk]
            for c in range(HD):
                x = row[c]
                amax[c] = max(amax[c], abs(x))
                mnr[c] = min(mnr[c], x)
                mxr[c] = max(mxr[c], x)
        # outliers: per head the n_out largest |K| channels, lower index first on ties
        taken = np.zeros(HD, np.bool_)
        oidx = np.empty((H, n_out), np.int64)
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
        kidx = np.empty(Ck, np.int64)
        j = 0
        for c in range(HD):
            if not taken[c]:
                kidx[j] = c
                j += 1
        mn = np.empty(ng, np.float32)
        mx = np.empty(ng, np.float32)
        for g in range(nk):
            for j in range(Ck):
                mn[g * Ck + j] = gmn[g, kidx[j]]
                mx[g * Ck + j] = gmx[g, kidx[j]]
        inv = np.empty(ng, np.float32)
        mf = np.empty(ng, np.float32)
        s32 = np.empty(ng, np.float32)
        exps[2 * layer] = _choose(mn, mx, ng, mant, kb[layer * ng:(layer + 1) * ng],
                                  m_all[layer * ng:(layer + 1) * ng], inv, mf, s32)
        for t in range(Tq):
            _quantize_row(X[t], kidx, Ck, inv, mf, (t // Gk) * Ck, 1, bits, q)
            _put_codes(q, Ck, bits, kq, (layer * Tq + t) * rb)
            for h in range(H):
                for j in range(n_out):
                    c = h * D + oidx[h, j]
                    so = ((layer * T + S + t) * HD + c) * w
                    do = ((layer * Tq + t) * H * n_out + h * n_out + j) * w
                    for i in range(w):
                        oraw_out[do + i] = src[so + i]
    for i in range(L * ng):
        _put_m12(km, i, m_all[i])


@njit(nogil=True, cache=True)
def _encode_v(src, kind, L, T, S, HD, Gv, bits, mant,  # type: ignore[no-untyped-def]
              vb, vm, vq, exps):
    Tq = T - S
    nv = (HD + Gv - 1) // Gv
    rb = HD if bits == 8 else (HD + 1) // 2
    ng = Tq * nv
    m_all = np.empty(L * ng, np.int32)
    X = np.empty((Tq, HD), np.float32)
    q = np.empty(HD, np.uint8)
    ident = np.arange(HD)
    mn = np.empty(ng, np.float32)
    mx = np.empty(ng, np.float32)
    inv = np.empty(ng, np.float32)
    mf = np.empty(ng, np.float32)
    s32 = np.empty(ng, np.float32)
    for layer in range(L):
        for t in range(Tq):
            row = X[t]
            _load_row(src, (layer * T + S + t) * HD, HD, kind, row)
            for g in range(nv):
                lo = np.float32(np.inf)
                hi = np.float32(-np.inf)
                for c in range(g * Gv, min(HD, (g + 1) * Gv)):
                    lo = min(lo, row[c])
                    hi = max(hi, row[c])
                mn[t * nv + g] = lo
                mx[t * nv + g] = hi
        exps[2 * layer + 1] = _choose(mn, mx, ng, mant, vb[layer * ng:(layer + 1) * ng],
                                      m_all[layer * ng:(layer + 1) * ng], inv, mf, s32)
        for t in range(Tq):
            _quantize_row(X[t], ident, HD, inv, mf, t * nv, Gv, bits, q)
            _put_codes(q, HD, bits, vq, (layer * Tq + t) * rb)
    for i in range(L * ng):
        _put_m12(vm, i, m_all[i])


@njit(nogil=True, cache=True)
def _decode_k(kb, km, kq, oidx_in, oraw, exps, kind, L, T, S, H, D,  # type: ignore[no-untyped-def]
              n_out, Gk, bits, mant, out):
    HD = H * D
    Tq = T - S
    Ck = H * (D - n_out)
    nk = (Tq + Gk - 1) // Gk
    w = 2 if kind == 2 else 1
    rb = Ck if bits == 8 else (Ck + 1) // 2
    ng = nk * Ck
    step = 1 if bits == 8 else 17
    s32 = np.empty(ng, np.float32)
    mi = np.empty(ng, np.int32)
    vals = np.zeros(HD, np.float32)
    q = np.empty(Ck, np.uint8)
    kidx = np.empty(Ck, np.int64)
    for layer in range(L):
        tab = _table(np.int64(exps[2 * layer]), mant)
        for i in range(ng):
            s32[i] = np.float32(tab[kb[layer * ng + i]])
            mi[i] = _get_m12(km, layer * ng + i)
        taken = np.zeros(HD, np.bool_)
        for h in range(H):
            for j in range(n_out):
                taken[h * D + oidx_in[(layer * H + h) * n_out + j]] = True
        j = 0
        for c in range(HD):
            if not taken[c]:
                kidx[j] = c
                j += 1
        for t in range(Tq):
            base = (t // Gk) * Ck
            _get_codes(kq, (layer * Tq + t) * rb, Ck, bits, q)
            for j in range(Ck):
                vals[kidx[j]] = np.float32(mi[base + j] + step * np.int32(q[j])) * s32[base + j]
            _store_row(vals, HD, kind, out, (layer * T + S + t) * HD)
            for h in range(H):
                for j in range(n_out):
                    c = h * D + oidx_in[(layer * H + h) * n_out + j]
                    do = ((layer * T + S + t) * HD + c) * w
                    so = ((layer * Tq + t) * H * n_out + h * n_out + j) * w
                    for i in range(w):
                        out[do + i] = oraw[so + i]


@njit(nogil=True, cache=True)
def _decode_v(vb, vm, vq, exps, kind, L, T, S, HD, Gv, bits, mant,  # type: ignore[no-untyped-def]
              out):
    Tq = T - S
    nv = (HD + Gv - 1) // Gv
    rb = HD if bits == 8 else (HD + 1) // 2
    ng = Tq * nv
    step = 1 if bits == 8 else 17
    s32 = np.empty(ng, np.float32)
    mi = np.empty(ng, np.int32)
    vals = np.empty(HD, np.float32)
    q = np.empty(HD, np.uint8)
    for layer in range(L):
        tab = _table(np.int64(exps[2 * layer + 1]), mant)
        for i in range(ng):
            s32[i] = np.float32(tab[vb[layer * ng + i]])
            mi[i] = _get_m12(vm, layer * ng + i)
        for t in range(Tq):
            _get_codes(vq, (layer * Tq + t) * rb, HD, bits, q)
            for g in range(nv):
                s = s32[t * nv + g]
                m = mi[t * nv + g]
                for c in range(g * Gv, min(HD, (g + 1) * Gv)):
                    vals[c] = np.float32(m + step * np.int32(q[c])) * s
            _store_row(vals, HD, kind, out, (layer * T + S + t) * HD)


@njit(nogil=True, cache=True)
def _int8_to_int4_rows(src, rows, width, dst):  # type: ignore[no-untyped-def]
    rb = (width + 1) // 2
    for r in range(rows):
        for j in range(width // 2):
            a = (np.int32(src[r * width + 2 * j]) + 8) // 17
            b = (np.int32(src[r * width + 2 * j + 1]) + 8) // 17
            dst[r * rb + j] = np.uint8(a | (b << 4))
        if width % 2:
            dst[r * rb + width // 2] = np.uint8((np.int32(src[r * width + width - 1]) + 8) // 17)


# --- the Python side ------------------------------------------------------------------------

def _words(t: torch.Tensor) -> _U16:
    """A tensor's memory as a flat uint16 array (no copy when contiguous)."""
    a: _U16 = t.contiguous().view(torch.int16).numpy().reshape(-1).view(np.uint16)
    return a


def _bits(lay: Layout) -> int:
    return 8 if lay.codec is Codec.INT8 else 4


def encode_into(page: Page, lay: Layout, buf: bytearray) -> None:
    """Write the payload of ``page`` (CPU tensors) into ``buf`` (header already in place)."""
    arr = np.frombuffer(buf, dtype=np.uint8)

    def sec(name: str) -> NDArray[np.uint8]:
        off, n = lay.section(name)
        return arr[off:off + n]

    k, v = _words(page.k), _words(page.v)
    if lay.codec is Codec.NONE:
        sec("kraw").view(np.uint16)[:] = k
        sec("vraw").view(np.uint16)[:] = v
        return
    L, T, S, w = lay.L, lay.T, lay.S, lay.esize // 2
    row = lay.HD * w
    if S:
        sink = sec("sink").view(np.uint16).reshape(2, L, S, row)
        sink[0] = k.reshape(L, T, row)[:, :S]
        sink[1] = v.reshape(L, T, row)[:, :S]
    if lay.Tq == 0:
        return
    kind, bits = KINDS[lay.dtype], _bits(lay)
    exps = sec("exps").view(np.int16)
    _encode_k(k, kind, L, T, S, lay.H, lay.D, lay.n_out, lay.Gk, bits, _MANT,
              sec("oidx").view(np.int16), sec("oraw").view(np.uint16), sec("kb"), sec("km"),
              sec("kq"), exps)
    _encode_v(v, kind, L, T, S, lay.HD, lay.Gv, bits, _MANT, sec("vb"), sec("vm"), sec("vq"),
              exps)


def decode(blob: memoryview, lay: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V (fresh CPU tensors in the page dtype) from a verified blob."""
    arr = np.frombuffer(blob, dtype=np.uint8)
    arr.flags.writeable = False  # one compiled specialization whatever the caller passed

    def sec(name: str) -> NDArray[np.uint8]:
        off, n = lay.section(name)
        return arr[off:off + n]

    from kvtier.codecs.reference import TORCH_DTYPES

    k = torch.empty(lay.L, lay.T, lay.H, lay.D, dtype=TORCH_DTYPES[lay.dtype])
    v = torch.empty_like(k)
    kw, vw = _words(k), _words(v)
    if lay.codec is Codec.NONE:
        kw[:] = sec("kraw").view(np.uint16)
        vw[:] = sec("vraw").view(np.uint16)
        return k, v
    L, T, S, w = lay.L, lay.T, lay.S, lay.esize // 2
    row = lay.HD * w
    if S:
        sink = sec("sink").view(np.uint16).reshape(2, L, S, row)
        kw.reshape(L, T, row)[:, :S] = sink[0]
        vw.reshape(L, T, row)[:, :S] = sink[1]
    if lay.Tq == 0:
        return k, v
    kind, bits = KINDS[lay.dtype], _bits(lay)
    exps = sec("exps").view(np.int16)
    _decode_k(sec("kb"), sec("km"), sec("kq"), sec("oidx").view(np.int16),
              sec("oraw").view(np.uint16), exps, kind, L, T, S, lay.H, lay.D, lay.n_out, lay.Gk,
              bits, _MANT, kw)
    _decode_v(sec("vb"), sec("vm"), sec("vq"), exps, kind, L, T, S, lay.HD, lay.Gv, bits, _MANT,
              vw)
    return k, v


def int8_rows_to_int4(src: memoryview, width: int, dst: memoryview) -> None:
    """Rows of ``width`` int8 codes -> packed int4 rows on the same grid (integer only)."""
    a = np.frombuffer(src, dtype=np.uint8)
    a.flags.writeable = False
    rows = a.size // width if width else 0
    _int8_to_int4_rows(a, rows, width, np.frombuffer(dst, dtype=np.uint8))


def warmup() -> float:
    """Compile every kernel now (or load it from numba's cache); returns the seconds it took.

    The daemon calls this at start so that JIT compilation never lands in a request.
    """
    from kvtier.codecs.codec import decode as decode_blob
    from kvtier.codecs.codec import encode as encode_blob
    from kvtier.codecs.codec import transcode
    from kvtier.config import CodecConfig

    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    page = Page(k=torch.randn(1, 6, 1, 8, generator=g).half(),
                v=torch.randn(1, 6, 1, 8, generator=g).half(), start_position=0)
    params = CodecConfig()
    blob = encode_blob(page, Codec.INT8, params)
    decode_blob(blob)
    decode_blob(bytearray(blob))
    decode_blob(transcode(blob, Codec.INT4, params))
    took = time.perf_counter() - t0
    log.info("codec kernels ready in %.2f s", took)
    return took
