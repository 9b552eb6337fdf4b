"""The CPU fast path: blob sections as numpy views, handed to the numba layer kernels.

The unfused torch code (:mod:`kvtier.codecs.reference`) walks the page about ten times
(cast to float32, abs, amax, amin, gather, divide, round, clamp, cast, pack ...), each pass a
trip to memory. These kernels work a layer at a time: the layer is read once, converted to
float32 into a scratch block that stays in cache, and every later step reads the scratch.
(:mod:`kvtier.codecs.kernels`; row helpers in :mod:`kvtier.codecs.rowops`.)
The arithmetic is the reference's step for step (float64 grid selection; float32 multiply
then subtract, round-half-even; float32 -> float16 and -> bfloat16 round-to-nearest-even),
so blobs and decoded tensors agree with the torch oracle bit for bit; the tests check it.

Page tensors are handled as flat ``uint16`` words whatever their dtype (a float32 element is
two words), which keeps one compiled specialization per kernel. Kernels release the GIL
(``nogil``), so threads encoding different pages run in parallel; a page is one thread's
work (numba's default thread pool is not safe to enter from several threads at once). :func:`warmup` compiles them (or
loads them from numba's on-disk cache) so the first real request does not pay for it.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from numpy.typing import NDArray

from kvtier.codecs import kernels
from kvtier.codecs.grid import MANTISSAS
from kvtier.codecs.layout import Layout
from kvtier.codecs.reference import TORCH_DTYPES
from kvtier.types import Codec, Page

log = logging.getLogger(__name__)

KINDS = {"float16": 0, "bfloat16": 1, "float32": 2}
_MANT = np.array(MANTISSAS, dtype=np.float64)
_U16 = NDArray[np.uint16]


def available() -> bool:
    """The kernels run here (numba imported); callers fall back to torch otherwise."""
    return True


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
    kernels.encode_k(k, kind, L, T, S, lay.H, lay.D, lay.n_out, lay.Gk, bits, _MANT,
                     sec("oidx").view(np.int16), sec("oraw").view(np.uint16), sec("kb"),
                     sec("km"), sec("kq"), exps)
    kernels.encode_v(v, kind, L, T, S, lay.HD, lay.Gv, bits, _MANT, sec("vb"), sec("vm"),
                     sec("vq"), exps)


def decode(blob: memoryview, lay: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V (fresh CPU tensors in the page dtype) from a verified blob."""
    arr = np.frombuffer(blob, dtype=np.uint8)
    arr.flags.writeable = False  # one compiled specialization whatever the caller passed

    def sec(name: str) -> NDArray[np.uint8]:
        off, n = lay.section(name)
        return arr[off:off + n]

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
    kernels.decode_k(sec("kb"), sec("km"), sec("kq"), sec("oidx").view(np.int16),
                     sec("oraw").view(np.uint16), exps, kind, L, T, S, lay.H, lay.D,
                     lay.n_out, lay.Gk, bits, _MANT, kw)
    kernels.decode_v(sec("vb"), sec("vm"), sec("vq"), exps, kind, L, T, S, lay.HD, lay.Gv,
                     bits, _MANT, vw)
    return k, v


def int8_rows_to_int4(src: memoryview, width: int, dst: memoryview) -> None:
    """Rows of ``width`` int8 codes -> packed int4 rows on the same grid (integer only)."""
    a = np.frombuffer(src, dtype=np.uint8)
    a.flags.writeable = False
    rows = a.size // width if width else 0
    kernels.int8_to_int4_rows(a, rows, width, np.frombuffer(dst, dtype=np.uint8))


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
