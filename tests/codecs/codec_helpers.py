"""Small builders for codec tests: realistic KV-like pages and the error bound the codec pins."""

from __future__ import annotations

import torch

from kvtier.codecs.layout import layout_of
from kvtier.codecs.blob import read_header
from kvtier.codecs.pack import unpack_int4
from kvtier.types import Page

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def make_kv(shape: tuple[int, int, int, int], dtype: torch.dtype = torch.float16,
            start: int = 64, seed: int = 0, scale: float = 1.0) -> Page:
    """K with a per-channel bias and spread (as real key caches have), V plain noise."""
    g = torch.Generator().manual_seed(seed)
    L, T, H, D = shape
    bias = torch.randn(L, 1, H, D, generator=g) * 2.0
    spread = torch.rand(L, 1, H, D, generator=g) + 0.2
    k = (bias + spread * torch.randn(L, T, H, D, generator=g)) * scale
    v = torch.randn(L, T, H, D, generator=g) * scale * 0.5
    return Page(k=k.to(dtype), v=v.to(dtype), start_position=start)


def _group_steps(x: torch.Tensor, dim: int, g: int, bits: int) -> torch.Tensor:
    """Per element: the largest quantization step the grid contract allows for its group.

    ``x`` is float64 ``[L, A, B]``; groups of ``g`` run along ``dim`` (1 or 2). Step <=
    2**(1/16) * max((max-min)/254, |min|/2047, 2**-14 * widest need of the layer), times 17
    for int4 (see kvtier.codecs.grid).
    """
    n = x.shape[dim]
    steps = torch.empty_like(x)
    needs = []
    for lo in range(0, n, g):
        part = x.narrow(dim, lo, min(g, n - lo))
        mn = part.amin(dim=dim, keepdim=True)
        mx = part.amax(dim=dim, keepdim=True)
        nd = torch.maximum((mx - mn) / 254, mn.abs() / 2047)
        needs.append((lo, part.shape[dim], nd))
    layer_max = torch.stack([nd.reshape(nd.shape[0], -1).amax(1) for _, _, nd in needs]).amax(0)
    floor = layer_max * 2.0 ** -14
    for lo, width, nd in needs:
        step = torch.maximum(nd, floor.view(-1, 1, 1)) * 2 ** (1 / 16) * (17 if bits == 4 else 1)
        steps.narrow(dim, lo, width).copy_(step.expand_as(steps.narrow(dim, lo, width)))
    return steps


def error_bound(page: Page, sinks: int, bits: int, group: int = 64) -> tuple[torch.Tensor,
                                                                            torch.Tensor]:
    """Elementwise bounds for |K - K^| and |V - V^| before rounding to the page dtype."""
    L, T, H, D = page.shape
    out = []
    for t, by_tokens in ((page.k, True), (page.v, False)):
        x = t[:, sinks:].double().reshape(L, T - sinks, H * D)
        if by_tokens:
            st = _group_steps(x, 1, min(group, T - sinks), bits)
        else:
            st = _group_steps(x, 2, min(group, H * D), bits)
        full = torch.zeros(L, T, H * D, dtype=torch.float64)
        full[:, sinks:] = st / 2
        out.append(full.reshape(L, T, H, D))
    return out[0], out[1]


def ulp(t: torch.Tensor) -> torch.Tensor:
    """Spacing above |t| in t's dtype, as float64."""
    a = t.abs()
    return (torch.nextafter(a, torch.full_like(a, float("inf"))) - a).double()


def codes(blob: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """The K and V integer codes of a quantized blob, unpacked (uint8)."""
    lay = layout_of(read_header(blob))
    res = []
    for name, width in (("kq", lay.Ck), ("vq", lay.HD)):
        off, n = lay.section(name)
        raw = torch.frombuffer(bytearray(blob[off:off + n]), dtype=torch.uint8)
        rows = raw.reshape(-1, lay.row_bytes(width))
        res.append(rows if lay.codec.bits == 8 else unpack_int4(rows, width))
    return res[0], res[1]
