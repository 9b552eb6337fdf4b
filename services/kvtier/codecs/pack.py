"""Bit packing of int4 codes and 12-bit group minima (pure torch, any device).

int4 codes, two per byte. A row of ``n`` codes ``c0 c1 c2 ...`` (one row per token) takes
``ceil(n / 2)`` bytes; the even-indexed code sits in the low nibble::

      byte j of a row
    +---------+---------+
    | 7 6 5 4 | 3 2 1 0 |   bit
    +---------+---------+
    | c[2j+1] |  c[2j]  |   code (0..15)
    +---------+---------+

When ``n`` is odd the high nibble of the row's last byte is zero. Rows never share a byte,
so a row (a token) can be found without decoding the ones before it.

Group minima ``m`` (signed, -2048..2047, see :mod:`kvtier.codecs.grid`) are stored as 12-bit
two's complement, two groups in three bytes; an odd count is padded with a zero::

      byte 0          byte 1          byte 2
    +---------------+---------------+-------------------+-------------------+
    | m0 bits 7..0  | m1 bits 7..0  | m1 bits 11..8 (hi)| m0 bits 11..8 (lo)|
    +---------------+---------------+-------------------+-------------------+
"""

from __future__ import annotations

import torch


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """``[..., n]`` codes (uint8, 0..15) -> ``[..., ceil(n/2)]`` bytes."""
    n = codes.shape[-1]
    if n % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """``[..., nb]`` bytes -> ``[..., n]`` codes (uint8)."""
    lo = packed & 0x0F
    hi = packed >> 4
    both = torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])
    return both[..., :n]


def pack_m12(m: torch.Tensor) -> torch.Tensor:
    """Flat signed minima (int32, -2048..2047) -> ``3 * ceil(n/2)`` bytes (uint8)."""
    u = (m.to(torch.int32) & 0xFFF).reshape(-1)
    if u.numel() % 2:
        u = torch.nn.functional.pad(u, (0, 1))
    u0, u1 = u[0::2], u[1::2]
    out = torch.stack((u0 & 0xFF, u1 & 0xFF, (u0 >> 8) | ((u1 >> 8) << 4)), dim=-1)
    return out.reshape(-1).to(torch.uint8)


def unpack_m12(packed: torch.Tensor, n: int) -> torch.Tensor:
    """``3 * ceil(n/2)`` bytes -> ``n`` signed minima (int32)."""
    b = packed.to(torch.int32).reshape(-1, 3)
    u0 = b[:, 0] | ((b[:, 2] & 0x0F) << 8)
    u1 = b[:, 1] | ((b[:, 2] >> 4) << 8)
    u = torch.stack((u0, u1), dim=-1).reshape(-1)[:n]
    return torch.where(u >= 2048, u - 4096, u)
