"""The quantization grid of a group: a scale from a per-layer log table and an integer minimum.

Every group (64 values by default) is quantized asymmetrically on the grid

    x^ = (m + q) * s        int8: q in 0..255
    x^ = (m + 17 q) * s     int4: q in 0..15   (the int4 step is 17 s)

with two numbers of metadata, 2.5 bytes a group in all:

* ``s = table[b]``, an 8-bit scale code ``b`` into a log table of 16 steps per octave,
  ``table[b] = 2 ** (e0 + b / 16)``, with one base exponent ``e0`` per layer and tensor
  (K or V) chosen so the layer's widest group fits (so 16 octaves of dynamic range per layer;
  narrower groups are clamped to ``table[0]``, an error below 2**-16 of the layer's widest).
  Rounding the scale up to the table costs at most 2**(1/16) = 4.4% of resolution.
* ``m = floor(min / s)``, the group minimum in units of the scale, a 12-bit signed integer.
  Because the minimum sits on the scale grid, int8 -> int4 is pure integer work: with
  255 = 15 x 17, ``q4 = round(q8 / 17)`` lies on the int4 grid ``(m + 17 q4) s`` with the same
  ``m`` and ``s``, and a blob transcodes by rewriting its codes only.

The scale is the smallest table entry with ``s >= max((max - min) / 254, |min| / 2047)``: one
step of slack for the floor of the minimum keeps ``(m + 255) s >= max``, and the second term
keeps ``m`` within 12 bits (it only binds for groups far from zero relative to their width,
where the error is then below 2**-12 of the values, finer than float16 itself).

So for a group with ``min``/``max`` in float32 arithmetic: int8 error <= s/2, int4 <= 17 s/2,
plus the rounding of the result to the page dtype. Meta selection runs in float64 and code
arithmetic in float32 with separate multiply and add (no fused multiply-add), which is what
lets the numba kernels agree with this torch code bit for bit.
"""

from __future__ import annotations

import struct

import torch

STEPS = 16  # table entries per octave
M_MIN, M_MAX = -2048, 2047
E0_MIN, E0_MAX = -126, 111  # keep every table entry a normal float32
# 2 ** (i / 16) rounded to float32, as float64: the mantissas of the table.
MANTISSAS: tuple[float, ...] = tuple(
    struct.unpack("<f", struct.pack("<f", 2.0 ** (i / STEPS)))[0] for i in range(STEPS)
)


def pow2(e: torch.Tensor) -> torch.Tensor:
    """Exact ``2.0 ** e`` in float64 for integer ``e`` in the normal range (built from bits)."""
    return ((e.to(torch.int64) + 1023) << 52).view(torch.float64)


def base_exponent(need_max: torch.Tensor) -> torch.Tensor:
    """``e0`` per row: the smallest with ``2 ** (e0 + 15) >= need_max`` (clamped), int64."""
    _, e = torch.frexp(need_max)
    return (e.to(torch.int64) - (STEPS - 1)).clamp(E0_MIN, E0_MAX)


def table(e0: torch.Tensor) -> torch.Tensor:
    """``[rows] e0 -> [rows, 256]`` float64 scale tables (each entry a float32 value)."""
    b = torch.arange(256, device=e0.device)
    mant = torch.tensor(MANTISSAS, dtype=torch.float64, device=e0.device)[b % STEPS]
    return mant * pow2(e0[:, None] + (b // STEPS)[None, :])


def need(mn: torch.Tensor, mx: torch.Tensor) -> torch.Tensor:
    """The smallest scale a group with these float64 bounds may use."""
    return torch.maximum((mx - mn) / 254.0, mn.abs() / 2047.0)


def choose(mn: torch.Tensor, mx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                        torch.Tensor]:
    """Grid of every group: ``mn``/``mx`` are float64 ``[layers, groups]``.

    Returns ``(e0 int64 [layers], b uint8 [layers, groups], m int32 [layers, groups],
    s float32 [layers, groups])``.
    """
    nd = need(mn, mx)
    e0 = base_exponent(nd.amax(dim=1) if nd.shape[1] else torch.zeros_like(nd[:, 0]))
    tab = table(e0)
    b = torch.searchsorted(tab, nd.contiguous(), right=False).clamp(max=255)
    s = tab.gather(1, b)
    m = torch.floor(mn / s).clamp(M_MIN, M_MAX)
    return e0, b.to(torch.uint8), m.to(torch.int32), s.to(torch.float32)


def scales(e0: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """float32 scales ``[layers, groups]`` from stored exponents and codes."""
    return table(e0).gather(1, b.to(torch.int64)).to(torch.float32)


def quantize(x: torch.Tensor, m: torch.Tensor, s: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (uint8) of float32 ``x`` on the grid ``(m, s)`` broadcast against it."""
    y = x * (1.0 / s) - m.to(torch.float32)
    if bits == 8:
        return torch.round(y).clamp(0, 255).to(torch.uint8)
    return torch.round(y / 17.0).clamp(0, 15).to(torch.uint8)


def dequantize(q: torch.Tensor, m: torch.Tensor, s: torch.Tensor, bits: int) -> torch.Tensor:
    """float32 values of codes ``q`` on the grid ``(m, s)``."""
    n = m + (q.to(torch.int32) if bits == 8 else 17 * q.to(torch.int32))
    return n.to(torch.float32) * s
