"""Finding NaN and Inf in raw little-endian float bytes, on the bits, in one pass.

A float is NaN or Inf iff its exponent bits are all ones. The kernel reads the bytes as 64-bit
words holding 4 (16-bit floats) or 2 (float32) lanes, keeps each lane's exponent bits and adds
the lowest exponent bit to every lane: only a lane whose exponent was all ones carries into its
top (sign) bit, and no lane can carry into the next. OR-ing the sums over the buffer and testing
the lanes' top bits answers for the whole buffer. This runs at about twice the speed of the two
numpy max reductions it replaces and costs one call for a small page; it sits on every put.
"""

from __future__ import annotations

import numba
import numpy as np

from kvtier.errors import InvalidArgument
from kvtier.types import DTYPES, DType


def _lanes(d: DType) -> tuple[int, int, int]:
    """The exponent mask, the lowest exponent bit and the top bit of every lane of a 64-bit
    word of ``d`` values."""
    bits = 8 * d.itemsize
    lowest = d.exponent & -d.exponent
    spread = [sum(x << (bits * i) for i in range(64 // bits))
              for x in (d.exponent, lowest, 1 << (bits - 1))]
    return spread[0], spread[1], spread[2]


_LANES = {name: _lanes(d) for name, d in DTYPES.items()}
_TAIL = {name: (np.dtype(np.uint16 if d.itemsize == 2 else np.uint32), d.exponent)
         for name, d in DTYPES.items()}


@numba.njit(cache=True, nogil=True)
def _any_all_ones(words, mask, low, top):  # type: ignore[no-untyped-def]
    acc = np.uint64(0)
    for i in range(words.size):
        acc |= (words[i] & mask) + low
    return (acc & top) != 0


def check_finite(buf: memoryview | bytes, dtype: str, name: str) -> None:
    """InvalidArgument naming ``name`` if the ``dtype`` values in ``buf`` hold NaN or Inf."""
    b = np.frombuffer(buf, np.uint8)
    whole = b.size & ~7
    mask, low, top = _LANES[dtype]
    bad = whole > 0 and bool(_any_all_ones(b[:whole].view(np.uint64), np.uint64(mask),
                                           np.uint64(low), np.uint64(top)))
    if not bad and whole < b.size:  # fewer than 8 bytes left: 1-3 values
        lane, exp = _TAIL[dtype]
        bad = bool(((b[whole:].view(lane) & exp) == exp).any())
    if bad:
        raise InvalidArgument(f"{name} holds NaN or Inf values", field=name)


def warmup() -> None:
    """Compile the kernel (or load it from numba's cache) before the first put needs it, for
    read-only and writable buffers (numba specialises on both)."""
    for dtype in _LANES:
        check_finite(bytes(16), dtype, "warmup")
        check_finite(memoryview(bytearray(16)), dtype, "warmup")
