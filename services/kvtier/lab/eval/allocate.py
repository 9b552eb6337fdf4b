"""Per-channel bit allocation for keys, weighted by how much each channel moves the logits.

Key error matters through the attention logits ``q . k``: a channel's error costs in proportion
to ``E[q_c^2]``. The outlier channels of the keys are also where queries are large, so the
uniform 4 bits per key channel spend too little where it counts. This transform gives each
(layer, head) a budget of ``bits`` per key channel on average and distributes it by greedy
reverse water-filling on ``w_c = E[q_c^2] * range_c^2`` (the error of a channel at ``b`` bits
falls as ``4^-b``), each channel between ``min_bits`` and ``max_bits``. ``E[q_c^2]`` is
calibrated once per model (per layer, kv head and channel, summed over the rotary pair, so it
does not depend on position) and is model-level data, not charged per page; the per-page
allocation is stored as 4 bits per channel and charged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from kvtier.lab.eval.quant import (
    FULL_BITS,
    HEADER_BYTES,
    QuantSpec,
    fake_quant,
    meta_bytes,
    round_meta,
    sink_mask,
    quantize_values,
)
from kvtier.lab.eval.transforms import Roundtrip
from kvtier.types import Page


def query_energy(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """``E[q_c^2]`` per ``[layers, kv_heads, head_dim]`` from one forward over ``ids``.

    Rotary pairs ``(i, i + dim/2)`` share their summed energy (RoPE mixes them by position).
    """
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    found: list[torch.Tensor] = []

    def hook(module: Any, args: Any, output: torch.Tensor) -> None:
        q = output[0].float().reshape(-1, kv_heads, heads // kv_heads, dim)
        found.append(q.square().mean(dim=(0, 2)))

    layers = model.model.layers
    handles = [layer.self_attn.q_proj.register_forward_hook(hook) for layer in layers]
    try:
        with torch.inference_mode():
            model(input_ids=ids.to(next(model.parameters()).device)[None])
    finally:
        for h in handles:
            h.remove()
    e = torch.stack(found)  # [L, H, D]
    half = dim // 2
    pair = e[..., :half] + e[..., half:]
    return torch.cat([pair, pair], dim=-1).cpu()


def allocate(weights: torch.Tensor, bits: float, min_bits: int, max_bits: int) -> torch.Tensor:
    """Integer bits per channel (last dim) averaging ``bits``, greedy on ``w * 4^-b``."""
    dim = weights.shape[-1]
    b = torch.full_like(weights, float(min_bits))
    steps = int(round((bits - min_bits) * dim))
    gain = weights.clone()
    for _ in range(steps):
        cand = torch.where(b < max_bits, gain * 4.0 ** (-b), torch.full_like(gain, -1.0))
        idx = cand.argmax(dim=-1, keepdim=True)
        b.scatter_add_(-1, idx, torch.ones_like(idx, dtype=b.dtype))
    return b


@dataclass(frozen=True, slots=True)
class AllocTransform:
    """Keys per channel with calibrated per-channel bits; values through ``spec`` as usual."""

    spec: QuantSpec
    q_energy: torch.Tensor  # [L, H, D]
    min_bits: int = 2
    max_bits: int = 8
    name: str = "int4q"

    def roundtrip(self, page: Page) -> Roundtrip:
        layers, tokens, heads, dim = page.shape
        spec = self.spec
        spec.check_keys(tokens, dim)
        kf = page.k.float()
        tok_mask, sinks = sink_mask(tokens, page.start_position, spec, kf.device)
        big = torch.finfo(kf.dtype).max
        m = tok_mask.reshape(1, tokens, 1, 1)
        rng = (torch.where(m, -big, kf).amax(1) - torch.where(m, big, kf).amin(1))  # [L, H, D]
        w = self.q_energy.to(kf.device) * rng.square()
        bits = allocate(w, spec.bits, self.min_bits, self.max_bits)
        g = spec.k_group
        xs = kf.reshape(layers, tokens // g, g, heads, dim)
        ex = tok_mask.reshape(1, tokens // g, g, 1, 1)
        kq = fake_quant(xs, 2, bits[:, None, None], spec.clip, spec.meta_bits, 1, ex)
        kq = torch.where(m, round_meta(kf), kq.reshape(kf.shape))
        nbytes = HEADER_BYTES + layers * heads * dim * 0.5  # the allocation, 4 bits a channel
        nbytes += meta_bytes(layers * (tokens // g) * heads * dim, layers * heads * dim,
                              spec.meta_bits)
        nbytes += float(bits.sum()) * (tokens - sinks) / 8
        nbytes += sinks * layers * heads * dim * FULL_BITS / 8
        vq, vb = quantize_values(page.v, page.start_position, replace(spec, outlier_channels=0))
        return Roundtrip(Page(kq.to(page.k.dtype), vq, page.start_position),
                         int(math.ceil(nbytes + vb)))
