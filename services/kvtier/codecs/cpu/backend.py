"""The CPU backend of the codecs: blob sections as numpy views, handed to the numba kernels.

The unfused torch code (:mod:`kvtier.codecs.torch_reference`) walks the page about ten times
(cast to float32, abs, amax, amin, gather, divide, round, clamp, cast, pack ...), each pass a
trip to memory. These kernels work a layer at a time: the layer is read once, converted to
float32 into a scratch block that stays in cache, and every later step reads the scratch.
(:mod:`kvtier.codecs.cpu.int8_int4`; row helpers in :mod:`kvtier.codecs.cpu.rows`.)
The arithmetic is the reference's step for step (float64 grid selection; float32 multiply
then subtract, round-half-even; float32 -> float16 and -> bfloat16 round-to-nearest-even),
so blobs and decoded tensors agree with the torch oracle bit for bit; the tests check it.

Page tensors are handled as flat ``uint16`` words whatever their dtype (a float32 element is
two words), which keeps one compiled specialization per kernel. Kernels release the GIL
(``nogil``), so threads encoding different pages run in parallel; a page is one thread's work
(numba's prange pool is not safe to enter from many request threads at once).
:func:`kvtier.codecs.warmup` compiles them (or loads them from numba's on-disk cache) and
self-tests them, so the first real request does not pay for compilation.
"""

from __future__ import annotations


import numpy as np
import torch
from numpy.typing import NDArray

from kvtier.codecs.cpu import int4a as int4a_kernels
from kvtier.codecs.cpu import int8_int4 as kernels
from kvtier.codecs.cpu.intrinsics import FAST_BMI2
from kvtier.codecs.grid import MANTISSAS
from kvtier.codecs.layout import Layout
from kvtier.errors import CorruptPage
from kvtier.pages import torch_dtype
from kvtier.types import DTYPES, Codec, Page


_MANT = np.array(MANTISSAS, dtype=np.float64)
_U16 = NDArray[np.uint16]


# --- the Python side ------------------------------------------------------------------------

# numpy has float16 and float32 but no bfloat16: those two take the cheaper numpy-side views
_NUMPY_DTYPES = {d.name: np.dtype(d.numpy) for d in DTYPES.values() if d.numpy is not None}


def _words(t: torch.Tensor) -> _U16:
    """A tensor's memory as a flat uint16 array (no copy when contiguous).

    Views taken on the numpy side where numpy knows the dtype: each torch view costs about
    a microsecond, which is noticeable on a 64 KiB page.
    """
    if not t.is_contiguous():
        t = t.contiguous()
    if t.dtype is torch.bfloat16:
        t = t.view(torch.int16)
    a: _U16 = t.numpy().ravel().view(np.uint16)
    return a


def encode_into(page: Page, lay: Layout, buf: bytearray) -> None:
    """Write the payload of ``page`` (CPU tensors) into ``buf`` (header already in place)."""
    arr = np.frombuffer(buf, dtype=np.uint8)
    k, v = _words(page.k), _words(page.v)
    if lay.codec is Codec.NONE:
        off, n = lay.section("kraw")
        arr[off:off + n].view(np.uint16)[:] = k
        off, n = lay.section("vraw")
        arr[off:off + n].view(np.uint16)[:] = v
        return
    assert lay.plan is not None
    sec, geo = lay.plan
    kernels.encode_page(k, v, arr, sec, geo, _MANT)


def decode(blob: memoryview, lay: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V (CPU tensors in the page dtype, views of one fresh buffer) from a verified blob."""
    arr = np.frombuffer(blob, dtype=np.uint8)
    arr.flags.writeable = False  # one compiled specialization whatever the caller passed
    out, k, v = _new_kv(lay)
    if lay.codec is Codec.NONE:
        half = out.size // 2
        off, n = lay.section("kraw")
        out[:half] = arr[off:off + n].view(np.uint16)
        off, n = lay.section("vraw")
        out[half:] = arr[off:off + n].view(np.uint16)
        return k, v
    assert lay.plan is not None
    sec, geo = lay.plan
    status = kernels.decode_page(arr, sec, geo, _MANT, out)
    if status:
        raise CorruptPage("outlier channel indices out of range or not ascending" if status == 1
                          else "scale exponents out of range", field="blob")
    return k, v


_INT4A_STATUS = {
    1: "outlier channel indices out of range or not ascending",
    2: "scale exponents out of range",
    3: "key bit map holds widths outside 2..8 or does not spend the header's bits a head",
}


def decode_int4a(blob: memoryview, lay: Layout, plan: tuple[NDArray[np.int64],
                                                               NDArray[np.int64]]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of a verified int4a blob in one kernel (``int4a.decode_page``), ``plan`` the
    section bounds and geometry :func:`kvtier.codecs.int4a.page_plan` gives."""
    arr = np.frombuffer(blob, dtype=np.uint8)
    arr.flags.writeable = False
    out, k, v = _new_kv(lay)
    sec, geo = plan
    status = int4a_kernels.decode_page(arr, sec, geo, _MANT, int4a_kernels.TO_8_FLAT, out,
                                       FAST_BMI2)
    if status:
        raise CorruptPage(_INT4A_STATUS[status],
                          field="blob.kbits" if status == 3 else "blob")
    return k, v


def _new_kv(lay: Layout) -> tuple[_U16, torch.Tensor, torch.Tensor]:
    """A fresh ``[2, L, T, H, D]`` buffer in the page dtype: its words, and K and V over it.

    float16 and float32 buffers come from numpy with K and V made by ``torch.from_numpy``
    (about 2 us in all against 6 us for ``torch.empty``, a words view and ``unbind``).
    """
    shape = (2, lay.L, lay.T, lay.H, lay.D)
    np_dtype = _NUMPY_DTYPES.get(lay.dtype)
    if np_dtype is None:  # bfloat16
        kv = torch.empty(shape, dtype=torch_dtype(lay.dtype))
        k, v = kv.unbind(0)
        return _words(kv), k, v
    a = np.empty(shape, dtype=np_dtype)
    return a.reshape(-1).view(np.uint16), torch.from_numpy(a[0]), torch.from_numpy(a[1])


def int8_rows_to_int4(src: memoryview, width: int, dst: memoryview) -> None:
    """Rows of ``width`` int8 codes -> packed int4 rows on the same grid (integer only)."""
    a = np.frombuffer(src, dtype=np.uint8)
    a.flags.writeable = False
    rows = a.size // width if width else 0
    kernels.int8_to_int4_rows(a, rows, width, np.frombuffer(dst, dtype=np.uint8))

