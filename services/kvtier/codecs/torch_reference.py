"""The pure-torch codec: runs on any device (the CUDA path) and is the oracle for the CPU kernels.

Each function maps a page to its payload bytes (a uint8 tensor on the page's device, laid out
as :mod:`kvtier.codecs.blob` describes) or back. The numba kernels in
:mod:`kvtier.codecs.cpu.backend` must produce the same bytes and the same decoded tensors bit for
bit; the tests hold them to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvtier.codecs import grid
from kvtier.codecs.blob import HEADER_SIZE
from kvtier.codecs.layout import Layout
from kvtier.codecs.pack import pack_int4, pack_m12, unpack_int4, unpack_m12
from kvtier.pages import torch_dtype
from kvtier.types import Codec, Page


def _bits(lay: Layout) -> int:
    return 8 if lay.codec is Codec.INT8 else 4


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def outlier_channels(kq: torch.Tensor, n_out: int) -> torch.Tensor:
    """``[L, H, n_out]`` int64: per (layer, head) the channels of largest |K| over the quantized
    tokens, ascending; ties go to the lower channel (a stable sort), so the choice is exact."""
    mag = kq.abs().amax(dim=1)
    order = torch.sort(mag, dim=-1, descending=True, stable=True).indices[..., :n_out]
    return order.sort(dim=-1).values


def kept_channels(oidx: torch.Tensor, H: int, D: int) -> torch.Tensor:
    """``[L, C']`` int64 flat (head * D + dim) indices of the quantized K channels, ascending."""
    L = oidx.shape[0]
    mask = torch.ones(L, H, D, dtype=torch.bool, device=oidx.device)
    mask.scatter_(2, oidx, False)
    return mask.reshape(L, H * D).nonzero()[:, 1].reshape(L, -1)


def _group_bounds(x: torch.Tensor, dim: int, g: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 min/max of groups of ``g`` along ``dim`` of float32 ``x`` (last group short)."""
    pad = n * g - x.shape[dim]
    pads = [0, 0] * (x.dim() - 1 - dim) + [0, pad]
    lo = F.pad(x, pads, value=float("inf"))
    hi = F.pad(x, pads, value=float("-inf"))
    shape = list(x.shape)
    shape[dim:dim + 1] = [n, g]
    return (lo.reshape(shape).amin(dim + 1).double(), hi.reshape(shape).amax(dim + 1).double())


def encode_payload(page: Page, lay: Layout) -> torch.Tensor:
    """The payload bytes of ``page`` under ``lay`` (uint8, on the page's device)."""
    k, v = page.k, page.v
    out = torch.zeros(lay.payload_nbytes, dtype=torch.uint8, device=k.device)

    def put(name: str, t: torch.Tensor) -> None:
        off, n = lay.section(name)
        flat = _as_bytes(t)
        assert flat.numel() == n, (name, flat.numel(), n)
        out[off - HEADER_SIZE: off - HEADER_SIZE + n] = flat

    if lay.codec is Codec.NONE:
        put("kraw", k)
        put("vraw", v)
        return out
    L, T, H, D, S, Tq = lay.L, lay.T, lay.H, lay.D, lay.S, lay.Tq
    put("sink", torch.stack((k[:, :S], v[:, :S])))
    if Tq == 0:
        return out
    bits = _bits(lay)
    kq = k[:, S:].float()
    oidx = outlier_channels(kq, lay.n_out)
    put("oidx", oidx.to(torch.int16))
    put("oraw", k[:, S:].gather(3, oidx[:, None].expand(L, Tq, H, lay.n_out)))
    kidx = kept_channels(oidx, H, D)
    kk = kq.reshape(L, Tq, H * D).gather(2, kidx[:, None, :].expand(L, Tq, lay.Ck))

    mn, mx = _group_bounds(kk, 1, lay.Gk, lay.nk)
    e0k, bk, mk, sk = grid.choose(mn.reshape(L, -1), mx.reshape(L, -1))
    put("kb", bk)
    put("km", pack_m12(mk))
    tok_group = torch.arange(Tq, device=k.device) // lay.Gk
    m_t = mk.reshape(L, lay.nk, lay.Ck)[:, tok_group]
    s_t = sk.reshape(L, lay.nk, lay.Ck)[:, tok_group]
    qk = grid.quantize(kk, m_t, s_t, bits)
    put("kq", qk if bits == 8 else pack_int4(qk))

    vv = v[:, S:].float().reshape(L, Tq, lay.HD)
    mn, mx = _group_bounds(vv, 2, lay.Gv, lay.nv)
    e0v, bv, mv, sv = grid.choose(mn.reshape(L, -1), mx.reshape(L, -1))
    put("vb", bv)
    put("vm", pack_m12(mv))
    m_c = mv.reshape(L, Tq, lay.nv).repeat_interleave(lay.Gv, dim=2)[..., :lay.HD]
    s_c = sv.reshape(L, Tq, lay.nv).repeat_interleave(lay.Gv, dim=2)[..., :lay.HD]
    qv = grid.quantize(vv, m_c, s_c, bits)
    put("vq", qv if bits == 8 else pack_int4(qv))
    put("exps", torch.stack((e0k, e0v), dim=1).to(torch.int16))
    return out


def decode_payload(payload: torch.Tensor, lay: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V (page dtype, on ``payload``'s device) from payload bytes under ``lay``."""
    dt = torch_dtype(lay.dtype)
    L, T, H, D, S, Tq = lay.L, lay.T, lay.H, lay.D, lay.S, lay.Tq

    def get(name: str) -> torch.Tensor:
        off, n = lay.section(name)
        return payload[off - HEADER_SIZE: off - HEADER_SIZE + n]

    if lay.codec is Codec.NONE:
        return (get("kraw").view(dt).reshape(L, T, H, D).clone(),
                get("vraw").view(dt).reshape(L, T, H, D).clone())
    k = torch.empty(L, T, H, D, dtype=dt, device=payload.device)
    v = torch.empty_like(k)
    sink = get("sink").view(dt).reshape(2, L, S, H, D)
    k[:, :S] = sink[0]
    v[:, :S] = sink[1]
    if Tq == 0:
        return k, v
    bits = _bits(lay)
    exps = get("exps").view(torch.int16).reshape(L, 2).to(torch.int64)
    oidx = get("oidx").view(torch.int16).reshape(L, H, lay.n_out).to(torch.int64)
    kidx = kept_channels(oidx, H, D)

    nkg = lay.nk * lay.Ck
    sk = grid.scales(exps[:, 0], get("kb").reshape(L, nkg)).reshape(L, lay.nk, lay.Ck)
    mk = unpack_m12(get("km"), L * nkg).reshape(L, lay.nk, lay.Ck)
    qk = get("kq").reshape(L, Tq, lay.row_bytes(lay.Ck))
    if bits == 4:
        qk = unpack_int4(qk, lay.Ck)
    tok_group = torch.arange(Tq, device=payload.device) // lay.Gk
    xk = grid.dequantize(qk, mk[:, tok_group], sk[:, tok_group], bits).to(dt)
    kfull = torch.empty(L, Tq, lay.HD, dtype=dt, device=payload.device)
    kfull.scatter_(2, kidx[:, None, :].expand(L, Tq, lay.Ck), xk)
    kfull4 = kfull.view(L, Tq, H, D)
    oraw = get("oraw").view(dt).reshape(L, Tq, H, lay.n_out)
    kfull4.scatter_(3, oidx[:, None].expand(L, Tq, H, lay.n_out), oraw)
    k[:, S:] = kfull4

    nvg = Tq * lay.nv
    sv = grid.scales(exps[:, 1], get("vb").reshape(L, nvg)).reshape(L, Tq, lay.nv)
    mv = unpack_m12(get("vm"), L * nvg).reshape(L, Tq, lay.nv)
    qv = get("vq").reshape(L, Tq, lay.row_bytes(lay.HD))
    if bits == 4:
        qv = unpack_int4(qv, lay.HD)
    m_c = mv.repeat_interleave(lay.Gv, dim=2)[..., :lay.HD]
    s_c = sv.repeat_interleave(lay.Gv, dim=2)[..., :lay.HD]
    v[:, S:] = grid.dequantize(qv, m_c, s_c, bits).to(dt).reshape(L, Tq, H, D)
    return k, v


def int8_to_int4(q8: torch.Tensor) -> torch.Tensor:
    """int8 codes -> int4 codes on the same grid: ``round(q8 / 17)`` in integers (no ties,
    since 17 is odd)."""
    return ((q8.to(torch.int32) + 8) // 17).to(torch.uint8)
