"""The evaluation's own group-wise quantizer, with every protection switchable.

This is a prototype of what a tier codec does, written so each protection can be turned on and off
and its effect measured (the ablation). It works on whole pages ``[layers, tokens, heads, dim]``
and reports the bytes the page would occupy with all metadata counted, so settings can be
compared at equal bits per element. The tier stack's real codecs live in :mod:`kvtier.codecs`;
the evaluation runs those too, through :class:`kvtier.lab.eval.transforms.CodecTransform`.

Scheme (asymmetric, min/max per group, ``q = round((x - min) / scale)``):

* keys per channel (each group = ``k_group`` consecutive tokens of one channel) or per token
  (each group = ``k_group`` consecutive channels of one token);
* values per token (each group = ``v_group`` consecutive channels of one token);
* the first ``sink_tokens`` positions of the sequence stay in full precision and are left out
  of the group ranges (they are outliers that would widen every range they sit in);
* ``outlier_channels`` key channels per (layer, head) with the largest magnitude stay in full
  precision and are left out of per-token ranges;
* ``rotate_k`` / ``rotate_v``: an orthonormal Hadamard rotation of the head dimension before
  quantizing, inverted after decoding (exact up to rounding). It spreads a few large channels
  over all channels so per-token ranges shrink (QuaRot / QuIP# incoherence processing);
* ``clip``: per group, the range is shrunk by the factor in ``CLIP_RATIOS`` that gives the
  smallest squared error (no extra bits; measured to hurt on SmolLM2: attention needs the
  extreme values that clipping saturates, so the smaller mean error is the wrong target);
* ``rope_theta`` (> 0): keys are quantized pre-RoPE. The page's positions are known
  (``start_position + t``), so the rotary embedding is undone before quantizing and redone
  after decoding: an exact orthogonal map per token that costs no bits. Pre-RoPE key channels
  keep a steady magnitude over tokens, while post-RoPE the fast-rotating pairs swing over
  their whole range, so per-channel groups get much narrower (KVQuant's pre-RoPE keys);
* ``v_bits`` (> 0): a different bit width for values than for keys;
* ``meta_bits``: 16 stores scale and minimum as float16 each; 8 stores them as 8-bit codes
  relative to a float16 (scale, min) pair per (layer, head, channel) or (layer, head, token)
  row, the double-quantization trick, halving the metadata.

Bytes per page are ``codes + metadata + full-precision values + outlier indices + header``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvtier.errors import InvalidArgument

HEADER_BYTES = 64
"""Fixed per-blob header charged to every prototype blob (magic, shape, dtype, checksum...)."""

FULL_BITS = 16
"""Full-precision values inside a quantized page are stored as float16."""

CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


@dataclass(frozen=True, slots=True)
class QuantSpec:
    """One quantization setting. ``bits`` 2..8; group sizes must divide the axis they group."""

    bits: int = 4
    k_per_channel: bool = True
    k_group: int = 64
    v_group: int = 64
    sink_tokens: int = 0
    outlier_channels: int = 0
    rotate_k: bool = False
    rotate_v: bool = False
    clip: bool = False
    meta_bits: int = 16
    rope_theta: float = 0.0
    v_bits: int = 0

    def _check_bits(self) -> None:
        if not 2 <= self.bits <= 8:
            raise InvalidArgument(f"bits must be 2..8, got {self.bits}", field="bits")
        if self.v_bits and not 2 <= self.v_bits <= 8:
            raise InvalidArgument(f"v_bits must be 0 or 2..8, got {self.v_bits}", field="v_bits")
        if self.rope_theta < 0:
            raise InvalidArgument(f"rope_theta must be >= 0, got {self.rope_theta}",
                                  field="rope_theta")
        if self.meta_bits not in (8, 16):
            raise InvalidArgument(f"meta_bits must be 8 or 16, got {self.meta_bits}",
                                  field="meta_bits")
        if self.sink_tokens < 0:
            raise InvalidArgument("sink_tokens must be >= 0", field="sink_tokens")

    def check_values(self, dim: int) -> None:
        """Raise InvalidArgument naming the field when the spec does not fit values."""
        self._check_bits()
        if self.v_group < 2 or dim % self.v_group:
            raise InvalidArgument(f"v_group {self.v_group} must divide head_dim {dim}",
                                  field="v_group")
        if self.rotate_v and dim & (dim - 1):
            raise InvalidArgument(f"a Hadamard rotation needs a power-of-two head_dim, got {dim}",
                                  field="rotate_v")

    def check_keys(self, tokens: int, dim: int) -> None:
        """Raise InvalidArgument naming the field when the spec does not fit keys."""
        self._check_bits()
        k_axis = tokens if self.k_per_channel else dim
        if self.k_group < 2 or k_axis % self.k_group:
            raise InvalidArgument(
                f"k_group {self.k_group} must divide the {'tokens' if self.k_per_channel else 'dim'}"
                f" axis of {k_axis}", field="k_group")
        if not 0 <= self.outlier_channels < dim:
            raise InvalidArgument(f"outlier_channels must be 0..{dim - 1}, got "
                                  f"{self.outlier_channels}", field="outlier_channels")
        if self.rotate_k and dim & (dim - 1):
            raise InvalidArgument(f"a Hadamard rotation needs a power-of-two head_dim, got {dim}",
                                  field="rotate_k")


@dataclass(frozen=True, slots=True)
class Quantized:
    """A decoded page tensor pair and the bytes its encoded form occupies."""

    k: torch.Tensor
    v: torch.Tensor
    nbytes: int


def hadamard(n: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix of order ``n`` (a power of two): H @ H.T = I."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(device=device, dtype=dtype)


def rope_tables(start_position: int, tokens: int, dim: int, theta: float,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[tokens, 1, dim]`` of the Llama rotary embedding (half-split pairs)."""
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim))
    pos = torch.arange(start_position, start_position + tokens, dtype=torch.float64,
                       device=device)
    ang = torch.cat([pos[:, None] * inv, pos[:, None] * inv], dim=-1)
    return ang.cos().float()[:, None], ang.sin().float()[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               inverse: bool = False) -> torch.Tensor:
    """Rotate ``[layers, tokens, heads, dim]`` by the position angles (or back)."""
    return x * cos - _rotate_half(x) * sin if inverse else x * cos + _rotate_half(x) * sin


def round_meta(t: torch.Tensor) -> torch.Tensor:
    """Round to float16 and back: what a stored scale, minimum or kept value holds."""
    return t.to(torch.float16).to(torch.float32)


def _meta8(t: torch.Tensor, row_dim: int) -> torch.Tensor:
    """Round per-group metadata to 8-bit codes over a float16 (lo, hi) per row.

    ``row_dim`` is the axis holding the groups of one row; the row keeps a float16 range and
    each group keeps one byte, so metadata costs 8 bits per group plus 32 bits per row.
    """
    lo = round_meta(t.amin(dim=row_dim, keepdim=True))
    hi = round_meta(t.amax(dim=row_dim, keepdim=True))
    step = (hi - lo) / 255.0
    step = torch.where(step > 0, step, torch.ones_like(step))
    return torch.round((t - lo) / step).clamp(0, 255) * step + lo


def fake_quant(x: torch.Tensor, gdim: int, bits: int | torch.Tensor, clip: bool,
                meta_bits: int, row_dim: int, exclude: torch.Tensor | None) -> torch.Tensor:
    """Quantize-dequantize ``x`` with groups along ``gdim`` (already split out as its own axis).

    ``exclude`` (broadcastable bool mask) marks values left out of the ranges; they are
    restored by the caller. Metadata is rounded to what would be stored.
    """
    levels: float | torch.Tensor = (
        2.0 ** bits.float() - 1 if isinstance(bits, torch.Tensor) else float((1 << bits) - 1))
    if exclude is not None:
        big = torch.finfo(x.dtype).max
        mn = torch.where(exclude, big, x).amin(dim=gdim, keepdim=True)
        mx = torch.where(exclude, -big, x).amax(dim=gdim, keepdim=True)
        empty = mn > mx
        mn = torch.where(empty, torch.zeros_like(mn), mn)
        mx = torch.where(empty, torch.zeros_like(mx), mx)
    else:
        mn = x.amin(dim=gdim, keepdim=True)
        mx = x.amax(dim=gdim, keepdim=True)
    best: torch.Tensor | None = None
    best_err: torch.Tensor | None = None
    for ratio in CLIP_RATIOS if clip else (1.0,):
        mid = (mx + mn) / 2
        half = (mx - mn) / 2 * ratio
        lo, scale = mid - half, (2 * half) / levels
        if meta_bits == 8:
            lo, scale = _meta8(lo, row_dim), _meta8(scale, row_dim)
        else:
            lo, scale = round_meta(lo), round_meta(scale)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.round((x - lo) / safe).clamp_min(0)
        codes = (torch.minimum(codes, levels) if isinstance(levels, torch.Tensor)
                 else codes.clamp_max(levels))
        deq = codes * scale + lo
        if best is None:
            best = deq
            if not clip:
                break
            best_err = (deq - x).square().sum(dim=gdim, keepdim=True)
            continue
        err = (deq - x).square().sum(dim=gdim, keepdim=True)
        assert best_err is not None
        better = err < best_err
        best = torch.where(better, deq, best)
        best_err = torch.where(better, err, best_err)
    assert best is not None
    return best


def meta_bytes(groups: int, rows: int, meta_bits: int) -> float:
    """Bytes of the (scale, min) metadata of ``groups`` groups in ``rows`` rows."""
    if meta_bits == 16:
        return groups * 4.0
    return groups * 2.0 + rows * 2 * 4.0  # 1 byte each (scale, min) + fp16 (lo, hi) x 2 per row


def sink_mask(tokens: int, start_position: int, spec: QuantSpec,
              device: torch.device) -> tuple[torch.Tensor, int]:
    """A page's attention-sink tokens (absolute position < ``sink_tokens``) and their count."""
    sinks = max(0, min(tokens, spec.sink_tokens - start_position))
    mask = torch.zeros(tokens, dtype=torch.bool, device=device)
    mask[:sinks] = True
    return mask, sinks


def quantize_keys(k: torch.Tensor, start_position: int,
                  spec: QuantSpec) -> tuple[torch.Tensor, float]:
    """Round-trip keys ``[layers, tokens, heads, dim]``; returns them and their bytes."""
    layers, tokens, heads, dim = k.shape
    spec.check_keys(tokens, dim)
    kf = k.to(torch.float32)
    tables = None
    if spec.rope_theta > 0:
        tables = rope_tables(start_position, tokens, dim, spec.rope_theta, kf.device)
        kf = apply_rope(kf, *tables, inverse=True)
    rot = hadamard(dim, kf.device) if spec.rotate_k else None
    if rot is not None:
        kf = kf @ rot
    tok_mask, sinks = sink_mask(tokens, start_position, spec, kf.device)
    nbytes = 0.0
    # Outlier key channels per (layer, head): the largest absolute values over the page.
    ch_mask = torch.zeros(layers, 1, heads, dim, dtype=torch.bool, device=kf.device)
    if spec.outlier_channels:
        idx = kf.abs().amax(dim=1, keepdim=True).topk(spec.outlier_channels, dim=-1).indices
        ch_mask.scatter_(-1, idx, True)
        nbytes += layers * heads * spec.outlier_channels * (1 + (tokens - sinks) * FULL_BITS / 8)
    g = spec.k_group
    if spec.k_per_channel:
        xs = kf.reshape(layers, tokens // g, g, heads, dim)
        ex = tok_mask.reshape(1, tokens // g, g, 1, 1)
        kq = fake_quant(xs, 2, spec.bits, spec.clip, spec.meta_bits, 1, ex).reshape(kf.shape)
        groups, rows = layers * (tokens // g) * heads * dim, layers * heads * dim
    else:
        xs = kf.reshape(layers, tokens, heads, dim // g, g)
        ex = (tok_mask.reshape(1, tokens, 1, 1, 1)
              | ch_mask.reshape(layers, 1, heads, dim // g, g))
        kq = fake_quant(xs, 4, spec.bits, spec.clip, spec.meta_bits, 1, ex).reshape(kf.shape)
        groups, rows = layers * tokens * heads * (dim // g), layers * heads * (dim // g)
    nbytes += meta_bytes(groups, rows, spec.meta_bits)
    kq = torch.where(tok_mask.reshape(1, tokens, 1, 1) | ch_mask, round_meta(kf), kq)
    quant = k.numel() - sinks * layers * heads * dim
    quant -= (tokens - sinks) * layers * heads * spec.outlier_channels
    nbytes += quant * spec.bits / 8 + sinks * layers * heads * dim * FULL_BITS / 8
    if rot is not None:
        kq = kq @ rot.T
    if tables is not None:
        kq = apply_rope(kq, *tables)
    return kq.to(k.dtype), nbytes


def quantize_values(v: torch.Tensor, start_position: int,
                    spec: QuantSpec) -> tuple[torch.Tensor, float]:
    """Round-trip values ``[layers, tokens, heads, dim]`` per token; returns them and bytes."""
    layers, tokens, heads, dim = v.shape
    spec.check_values(dim)
    vf = v.to(torch.float32)
    rot = hadamard(dim, vf.device) if spec.rotate_v else None
    if rot is not None:
        vf = vf @ rot
    tok_mask, sinks = sink_mask(tokens, start_position, spec, vf.device)
    g = spec.v_group
    xs = vf.reshape(layers, tokens, heads, dim // g, g)
    ex = tok_mask.reshape(1, tokens, 1, 1, 1)
    bits = spec.v_bits or spec.bits
    vq = fake_quant(xs, 4, bits, spec.clip, spec.meta_bits, 1, ex).reshape(vf.shape)
    nbytes = meta_bytes(layers * tokens * heads * (dim // g), layers * heads * (dim // g),
                         spec.meta_bits)
    vq = torch.where(tok_mask.reshape(1, tokens, 1, 1), round_meta(vf), vq)
    nbytes += (v.numel() - sinks * layers * heads * dim) * bits / 8
    nbytes += sinks * layers * heads * dim * FULL_BITS / 8
    if rot is not None:
        vq = vq @ rot.T
    return vq.to(v.dtype), nbytes


def quantize_page(k: torch.Tensor, v: torch.Tensor, start_position: int,
                  spec: QuantSpec) -> Quantized:
    """Round-trip one page's K and V (``[layers, tokens, heads, dim]``) through ``spec``."""
    kq, kb = quantize_keys(k, start_position, spec)
    vq, vb = quantize_values(v, start_position, spec)
    return Quantized(k=kq, v=vq, nbytes=int(math.ceil(HEADER_BYTES + kb + vb)))
