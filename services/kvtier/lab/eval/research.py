"""The seed documents' compression ideas, as page transforms judged by the same yardstick.

* :class:`Fp8Transform`: float8 e4m3 with an absmax scale per group (keys per channel over
  ``group`` tokens, values per token over ``group`` channels) as the 8-bit alternative to int8.
* :class:`HaarTransform`: an orthonormal multi-level Haar wavelet along the tokens before the
  group quantizer, coefficients laid out by sub-band so each group holds one scale.
* :class:`GearTransform`: GEAR-style: group quantization plus a rank-``r`` SVD approximation of
  the quantization residual of each (layer, head) ``[tokens, dim]`` matrix, kept in float16.
* :class:`PcaVTransform`: values projected on the top-``rank`` principal directions of each
  (layer, head), calibrated once on other text; coefficients group-quantized. The basis is
  model-level data shared by every page and not charged per page.
* :class:`SemanticTransform`: semantic-aware grouping: key groups formed by similarity instead
  of position (the tokens of each (layer, head) sorted by their key's projection on the
  page's top principal direction before the group quantizer; the permutation is charged).

Every transform charges its bytes with all per-page metadata counted, plus the same fixed
header as the prototype quantizer, so they compare at equal bits per element.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvtier.errors import InvalidArgument
from kvtier.lab.eval.quant import (
    HEADER_BYTES,
    QuantSpec,
    quantize_keys,
    quantize_page,
    quantize_values,
)
from kvtier.lab.eval.transforms import Roundtrip
from kvtier.types import Page

_NO_SINKS = 1 << 30  # a start position past any sink window


@dataclass(frozen=True, slots=True)
class Fp8Transform:
    """float8 e4m3 codes with a float16 absmax scale per group of ``group`` values."""

    name: str = "fp8"
    group: int = 64

    def roundtrip(self, page: Page) -> Roundtrip:
        layers, tokens, heads, dim = page.shape
        if tokens % self.group or dim % self.group:
            raise InvalidArgument(f"fp8 group {self.group} must divide tokens and head_dim",
                                  field="group")
        k = page.k.float().reshape(layers, tokens // self.group, self.group, heads, dim)
        v = page.v.float().reshape(layers, tokens, heads, dim // self.group, self.group)
        kq = _fp8(k, 2).reshape(page.k.shape)
        vq = _fp8(v, 4).reshape(page.v.shape)
        groups = 2 * page.k.numel() // self.group
        nbytes = HEADER_BYTES + 2 * page.k.numel() + 2 * groups
        return Roundtrip(Page(kq.to(page.k.dtype), vq.to(page.v.dtype), page.start_position),
                         nbytes)


def _fp8(x: torch.Tensor, gdim: int) -> torch.Tensor:
    fmax = torch.finfo(torch.float8_e4m3fn).max
    scale = (x.abs().amax(dim=gdim, keepdim=True) / fmax).to(torch.float16).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (x / scale).clamp(-fmax, fmax).to(torch.float8_e4m3fn).float() * scale


def haar(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Orthonormal Haar along dim 1, output in sub-band order [a_L, d_L, ..., d_1]."""
    bands = []
    a = x
    for _ in range(levels):
        even, odd = a[:, 0::2], a[:, 1::2]
        bands.append((even - odd) / math.sqrt(2))
        a = (even + odd) / math.sqrt(2)
    return torch.cat([a, *reversed(bands)], dim=1)


def inverse_haar(y: torch.Tensor, levels: int) -> torch.Tensor:
    tokens = y.shape[1]
    n = tokens >> levels
    a = y[:, :n]
    pos = n
    for _ in range(levels):
        d = y[:, pos:pos + a.shape[1]]
        pos += a.shape[1]
        out = torch.empty((a.shape[0], 2 * a.shape[1], *a.shape[2:]), dtype=a.dtype,
                          device=a.device)
        out[:, 0::2] = (a + d) / math.sqrt(2)
        out[:, 1::2] = (a - d) / math.sqrt(2)
        a = out
    return a


@dataclass(frozen=True, slots=True)
class HaarTransform:
    """Haar wavelet along tokens (``levels`` deep), then the group quantizer, then inverse."""

    spec: QuantSpec
    levels: int = 3
    name: str = "haar"

    def roundtrip(self, page: Page) -> Roundtrip:
        if page.shape[1] % (1 << self.levels):
            raise InvalidArgument(f"tokens must be a multiple of 2**{self.levels}",
                                  field="levels")
        k, v = haar(page.k.float(), self.levels), haar(page.v.float(), self.levels)
        q = quantize_page(k, v, _NO_SINKS, self.spec)
        kq, vq = inverse_haar(q.k, self.levels), inverse_haar(q.v, self.levels)
        return Roundtrip(Page(kq.to(page.k.dtype), vq.to(page.v.dtype), page.start_position),
                         q.nbytes)


def _low_rank(r: torch.Tensor, rank: int) -> torch.Tensor:
    """Best rank-``rank`` approximation of each ``[tokens, dim]`` matrix of ``[L, T, H, D]``."""
    m = r.permute(0, 2, 1, 3)  # [L, H, T, D]
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    a = (u[..., :rank] * s[..., None, :rank]).to(torch.float16).float()
    b = vh[..., :rank, :].to(torch.float16).float()
    out: torch.Tensor = (a @ b).permute(0, 2, 1, 3)
    return out


@dataclass(frozen=True, slots=True)
class GearTransform:
    """Group quantization plus a float16 rank-``rank`` approximation of the residual."""

    spec: QuantSpec
    rank: int = 2
    name: str = "gear"

    def roundtrip(self, page: Page) -> Roundtrip:
        layers, tokens, heads, dim = page.shape
        q = quantize_page(page.k, page.v, page.start_position, self.spec)
        kf, vf = page.k.float(), page.v.float()
        kq = q.k.float() + _low_rank(kf - q.k.float(), self.rank)
        vq = q.v.float() + _low_rank(vf - q.v.float(), self.rank)
        extra = 2 * layers * heads * self.rank * (tokens + dim) * 2
        return Roundtrip(Page(kq.to(page.k.dtype), vq.to(page.v.dtype), page.start_position),
                         q.nbytes + extra)


def pca_basis(values: torch.Tensor) -> torch.Tensor:
    """Per (layer, head) principal directions of calibration values ``[L, T, H, D]``.

    Returns ``[L, H, D, D]`` with columns sorted by decreasing variance (uncentred: the
    quantizer's per-group minimum already absorbs offsets).
    """
    m = values.float().permute(0, 2, 1, 3)  # [L, H, T, D]
    cov = m.transpose(-1, -2) @ m
    evals, evecs = torch.linalg.eigh(cov)
    out: torch.Tensor = evecs.flip(-1).contiguous()
    return out


@dataclass(frozen=True, slots=True)
class PcaVTransform:
    """Values on the top ``rank`` calibrated PCA directions; keys through ``spec`` as usual."""

    spec: QuantSpec
    basis: torch.Tensor  # [L, H, D, D], from pca_basis
    rank: int
    name: str = "pca-v"

    def roundtrip(self, page: Page) -> Roundtrip:
        layers, tokens, heads, dim = page.shape
        if not 1 <= self.rank <= dim:
            raise InvalidArgument(
                f"rank {self.rank} must be 1..{dim}", field="rank")
        basis = self.basis[..., : self.rank].to(page.v.device)  # [L, H, D, r]
        coef = torch.einsum("lthd,lhdr->lthr", page.v.float(), basis)
        kq, kb = quantize_keys(page.k, page.start_position, self.spec)
        cq, cb = quantize_values(coef, page.start_position, self.spec)
        vq = torch.einsum("lthr,lhdr->lthd", cq.float(), basis)
        nbytes = int(math.ceil(HEADER_BYTES + kb + cb))
        return Roundtrip(Page(kq, vq.to(page.v.dtype), page.start_position), nbytes)


@dataclass(frozen=True, slots=True)
class SemanticTransform:
    """The prototype quantizer with key groups formed by similarity instead of position.

    Keys are grouped per channel over ``k_group`` tokens; here the quantized tokens of each
    (layer, head) are first sorted by the projection of their key on the top principal
    direction of that head's (centred) keys in the page, so a group holds tokens whose keys
    are alike rather than neighbours, and are put back in order after decoding. The sort
    order is stored: ``ceil(log2 T')`` bits a token per (layer, head). Values (grouped over
    the channels of one token) do not depend on the token order. Attention-sink tokens stay
    in place.
    """

    spec: QuantSpec
    name: str

    def roundtrip(self, page: Page) -> Roundtrip:
        layers, tokens, heads, _ = page.shape
        sinks = max(0, min(tokens, self.spec.sink_tokens - page.start_position))
        n = tokens - sinks
        k = page.k.float()
        x = k[:, sinks:].permute(0, 2, 1, 3)  # [L, H, T', D]
        perm = _similarity_order(x)
        idx = perm[..., None].expand_as(x)
        ks = k.clone()
        ks[:, sinks:] = x.gather(2, idx).permute(0, 2, 1, 3)
        q = quantize_page(ks.to(page.k.dtype), page.v, page.start_position, self.spec)
        kq = q.k.float()
        body = kq[:, sinks:].permute(0, 2, 1, 3)
        back = torch.empty_like(body).scatter_(2, idx, body)
        kq[:, sinks:] = back.permute(0, 2, 1, 3)
        order_bits = layers * heads * n * max(1, math.ceil(math.log2(max(n, 2))))
        return Roundtrip(Page(kq.to(page.k.dtype), q.v, page.start_position),
                         q.nbytes + math.ceil(order_bits / 8))


def _similarity_order(x: torch.Tensor) -> torch.Tensor:
    """``[..., T, D]`` -> ``[..., T]``: the tokens sorted by their projection on the top
    principal direction of the centred rows."""
    xc = x - x.mean(dim=-2, keepdim=True)
    _, _, vh = torch.linalg.svd(xc, full_matrices=False)
    proj = (xc @ vh[..., 0, :, None])[..., 0]
    order: torch.Tensor = proj.argsort(dim=-1, stable=True)
    return order
