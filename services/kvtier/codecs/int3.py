"""int3: about 3 bits per element, the key bits and the value bits allocated per page.

The deep tier below int4a. An int3 blob is a function of the int4a blob of the same page (so of
its int8 blob): the grid (groups, scales, minima), the sinks and the outlier channels are
int4a's, and only the codes get fewer bits. So int8 -> int4a -> int3 transcodes on the integer
codes, and a direct encode is the int8 encoder, then int4a (:func:`kvtier.codecs.int4a.from_int8`),
then :func:`from_int4a`: the same bytes whichever way a page came down.

Keys: every quantized key channel gets int4a's width less one bit (1..7). int4a's widths come
from reverse water-filling on ``w_c e_b`` with ``e_b`` the squared step of ``b`` bits, about
``4^-b``: the optimum is ``b_c = const + log4(w_c)``, so a budget one bit a channel smaller
lowers every channel by one bit and keeps the allocation (the channels int4a left at 2 bits
go to 1: two levels, the group's ends). No weight is recomputed, and a head spends int4a's key
budget less one bit a channel (``key_bits`` in the header, 3 a channel by default).

Values: int4a's values are 4 bits on the int8 grid of groups of ``Gv`` channels of one token.
int3 gives each group 1..4 bits, by the same greedy water-filling as int4a's keys on
``w_g e_b`` with a weight per group (:func:`value_weights`: its channel count, so equal widths
today; the map lets a better weight change the encoder without changing the format). A
layer's groups spend ``round(value_bits T' nv / 16)`` widths in all (``value_bits`` in the
header, in 16ths of a bit: 48 = 3 bits by default, ``CodecConfig.int3_value_bits``).

Every code is an integer map of an int8 code, as in int4a: ``q_b = round(q8 (2^b - 1) / 255)``
and back ``q8' = round(q_b 255 / (2^b - 1))``; a key or value code of int4a is taken back to
its int8 code, then to the narrower width. Decoding maps the codes back to int8 codes
(:func:`to_int8`) and runs the int8 decoder.

Payload: int4a's sections, with ``kbits`` holding the int3 widths and one more (``vbits``)::

    kbits  u4  [L, C']          bits of each quantized K channel (1..8), nibbles as int4 packs
    vbits  u2  [L, T' nv]       bits of each V group less one (0..3), four a byte from the low
                                bits; a layer's row padded to a byte
    kq     bits[L, T', H kb]    K codes as in int4a (a token row is a little-endian bit string)
    vq     bits[L, vb Gv]       a layer's V codes as one little-endian bit string: token by
                                token, group by group, channel by channel, each code as wide as
                                its group's bits; ``ceil(v_budget Gv / 8)`` bytes a layer

The decoder checks both maps (widths in range, each layer's sum the header's budget) before
using them. The map work runs as numba kernels on the CPU (:mod:`kvtier.codecs.cpu.int3`) and
as the torch code here on any device; the tests hold both to the same bytes.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from kvtier.codecs import int4a
from kvtier.codecs.blob import HEADER_SIZE
from kvtier.codecs.cpu import int3 as k3
from kvtier.codecs.int4a import (
    codes_from_int8,
    codes_to_int8,
    pack_codes,
    unpack_codes,
)
from kvtier.codecs.layout import Layout, make_layout
from kvtier.codecs.pack import pack_int4, unpack_int4
from kvtier.errors import CorruptPage
from kvtier.types import Codec

KEY_WIDTHS = (1, 8)
VALUE_WIDTHS = (1, 4)
_ERR = {b: (255.0 / ((1 << b) - 1)) ** 2 for b in range(1, 9)}
_OWN = ("kq", "vq", "kbits", "vbits")  # the sections int3 writes itself
Blob = bytes | bytearray | memoryview


def value_sixteenths(value_bits: float) -> int:
    """The header's ``value_bits``: V bits an element on average, in 16ths (16..64)."""
    return max(16, min(64, round(16 * value_bits)))


def int3_layout(lay4a: Layout, value_bits: float) -> Layout:
    """The int3 layout of the page an int4a layout describes (same grid, sinks, outliers)."""
    kept = lay4a.D - lay4a.n_out
    return make_layout(Codec.INT3, lay4a.dtype, (lay4a.L, lay4a.T, lay4a.H, lay4a.D), lay4a.S,
                       lay4a.n_out, lay4a.group_size, lay4a.key_bits - kept,
                       value_sixteenths(value_bits))


def int8_layout(lay: Layout) -> Layout:
    """The int8 layout an int3 layout expands to."""
    return make_layout(Codec.INT8, lay.dtype, (lay.L, lay.T, lay.H, lay.D), lay.S, lay.n_out,
                       lay.group_size)


def group_lengths(lay: Layout) -> list[int]:
    """Channels of each V group of a token (the last one may be shorter)."""
    return [min(lay.Gv, lay.HD - g * lay.Gv) for g in range(lay.nv)]


def allocate(w: torch.Tensor, budget: int, lo: int, hi: int) -> torch.Tensor:
    """Bits (uint8, ``lo..hi``) per entry of ``w`` (float64 ``[..., n]``, >= 0), ``budget``
    a row: every entry starts at ``lo`` and the ``budget - lo n`` one-bit moves that remove
    the most of ``w e_b`` are taken (moves listed bit by bit, a stable descending sort: ties
    go to the earlier move), as :func:`kvtier.codecs.int4a.allocate` does for 2..8."""
    n = w.shape[-1]
    drop = torch.tensor([_ERR[b] - _ERR[b + 1] for b in range(lo, hi)], dtype=w.dtype,
                        device=w.device)
    gains = (w.unsqueeze(-2) * drop[:, None]).flatten(-2)
    order = torch.sort(gains, dim=-1, descending=True, stable=True).indices
    take = torch.zeros_like(gains, dtype=torch.uint8)
    take.scatter_(-1, order[..., :budget - lo * n], 1)
    bits: torch.Tensor = take.reshape(*w.shape[:-1], hi - lo, n).sum(-2, dtype=torch.uint8) + lo
    return bits


def key_widths(b4: torch.Tensor, payload4a: torch.Tensor, lay4a: Layout) -> torch.Tensor:
    """int3's K widths from int4a's ``b4`` (``[L, C']``): one bit less a channel."""
    return b4 - 1


def value_weights(payload: torch.Tensor, lay: Layout) -> torch.Tensor:
    """``[L, T' nv]`` float64: each V group's weight in the allocation, its channel count
    ``n_g``: every group of a token gets the same width (the budget's remainder, when it is
    not a whole number of bits a group, goes to the first groups of the page).

    Not the mean squared error's ``n_g s_g^2``: on SmolLM2 that gave the tokens whose values
    span least (often those attention rests on) 1..2 bits and measured KL 0.027 against
    0.016 for equal widths (1,024 tokens, keys as below; ``docs/quality.md``)."""
    n = torch.tensor(group_lengths(lay), dtype=torch.float64, device=payload.device)
    return n.repeat(lay.L, lay.Tq)


def _section(payload: torch.Tensor, lay: Layout, name: str) -> torch.Tensor:
    off, n = lay.section(name)
    return payload[off - HEADER_SIZE: off - HEADER_SIZE + n]


def _common(src: torch.Tensor, src_lay: Layout, dst_lay: Layout) -> torch.Tensor:
    """A zeroed payload under ``dst_lay`` with the grid, sinks and outliers of ``src``."""
    dst = torch.zeros(dst_lay.payload_nbytes, dtype=torch.uint8, device=src.device)
    for name, _, n in dst_lay.sections:
        if name not in _OWN:
            off = dst_lay.section(name)[0] - HEADER_SIZE
            dst[off:off + n] = _section(src, src_lay, name)
    return dst


def _channel_widths(vbits: torch.Tensor, lay: Layout) -> torch.Tensor:
    """``[L, T' nv]`` group widths -> ``[L, T' HD]`` element widths."""
    group = torch.arange(lay.HD, device=vbits.device) // lay.Gv
    return vbits.reshape(lay.L, lay.Tq, lay.nv)[:, :, group].reshape(lay.L, lay.Tq * lay.HD)


def pack_u2(widths: torch.Tensor) -> torch.Tensor:
    """``[L, n]`` widths 1..4 -> ``[L, ceil(n / 4)]`` bytes of ``width - 1``, low bits first."""
    w = (widths - 1).to(torch.uint8)
    pad = -w.shape[-1] % 4
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    w = w.reshape(w.shape[0], -1, 4)
    return w[..., 0] | (w[..., 1] << 2) | (w[..., 2] << 4) | (w[..., 3] << 6)


def unpack_u2(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_u2`: ``[L, nb]`` bytes -> ``[L, n]`` widths 1..4."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    w = (packed[..., None] >> shifts) & 3
    return w.reshape(packed.shape[0], -1)[:, :n] + 1


def from_int4a(payload4a: torch.Tensor, lay4a: Layout, value_bits: float, *,
               kernels: bool = True) -> tuple[torch.Tensor, Layout]:
    """The int3 payload (uint8, same device) of the page whose int4a payload is given
    (through the numba kernels on the CPU unless ``kernels`` is False)."""
    if kernels and payload4a.device.type == "cpu":
        buf, lay = from_int4a_blob(bytearray(HEADER_SIZE) + payload4a.numpy().tobytes(),
                                   lay4a, value_bits)
        return torch.frombuffer(buf, dtype=torch.uint8)[HEADER_SIZE:], lay
    lay = int3_layout(lay4a, value_bits)
    out = _common(payload4a, lay4a, lay)
    if lay.Tq == 0:
        return out, lay
    L, Tq, HD = lay.L, lay.Tq, lay.HD
    b4 = int4a.read_bits(payload4a, lay4a)
    kb = key_widths(b4, payload4a, lay4a)
    _section(out, lay, "kbits").copy_(pack_int4(kb).reshape(-1))
    q8 = codes_to_int8(unpack_codes(_section(payload4a, lay4a, "kq").reshape(L, Tq, -1), b4),
                       b4[:, None])
    qk = codes_from_int8(q8, kb[:, None])
    _section(out, lay, "kq").copy_(pack_codes(qk, kb, lay.kq_row_bytes).reshape(-1))
    vb = allocate(value_weights(payload4a, lay4a), lay.v_budget, *VALUE_WIDTHS)
    _section(out, lay, "vbits").copy_(pack_u2(vb).reshape(-1))
    q4 = unpack_int4(_section(payload4a, lay4a, "vq").reshape(L * Tq, -1), HD)
    width = _channel_widths(vb, lay)
    qv = codes_from_int8((17 * q4.to(torch.int32)).reshape(L, Tq * HD), width)
    _section(out, lay, "vq").copy_(
        pack_codes(qv[:, None], width, lay.vq_layer_bytes).reshape(-1))
    return out, lay


def read_maps(payload: torch.Tensor, lay: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """The checked key ``[L, C']`` and value ``[L, T' nv]`` bit maps of an int3 payload;
    raises CorruptPage."""
    kb = unpack_int4(_section(payload, lay, "kbits").reshape(lay.L, -1), lay.Ck)
    if bool(((kb < KEY_WIDTHS[0]) | (kb > KEY_WIDTHS[1])).any()) or \
            bool((kb.to(torch.int64).sum(-1) != lay.H * lay.key_bits).any()):
        raise _bad_map(lay, "key")
    vb = unpack_u2(_section(payload, lay, "vbits").reshape(lay.L, -1), lay.Tq * lay.nv)
    if bool((vb.to(torch.int64).sum(-1) != lay.v_budget).any()):
        raise _bad_map(lay, "value")
    return kb, vb


def _bad_map(lay: Layout, which: str) -> CorruptPage:
    if which == "key":
        return CorruptPage(f"key bit map holds widths outside {KEY_WIDTHS[0]}..{KEY_WIDTHS[1]} "
                           f"or does not spend the header's {lay.key_bits} bits a head",
                           field="blob.kbits")
    return CorruptPage(f"value bit map does not spend the header's {lay.v_budget} widths a "
                       f"layer", field="blob.vbits")


def to_int8(payload: torch.Tensor, lay: Layout, *,
            kernels: bool = True) -> tuple[torch.Tensor, Layout]:
    """The int8 payload (uint8, same device) that decodes to the page an int3 payload holds
    (through the numba kernels on the CPU unless ``kernels`` is False)."""
    if kernels and payload.device.type == "cpu":
        buf, lay8 = to_int8_blob(bytearray(HEADER_SIZE) + payload.numpy().tobytes(), lay)
        return torch.frombuffer(buf, dtype=torch.uint8)[HEADER_SIZE:], lay8
    lay8 = int8_layout(lay)
    out = _common(payload, lay, lay8)
    if lay.Tq == 0:
        return out, lay8
    L, Tq = lay.L, lay.Tq
    kb, vb = read_maps(payload, lay)
    qk = unpack_codes(_section(payload, lay, "kq").reshape(L, Tq, -1), kb)
    _section(out, lay8, "kq").copy_(codes_to_int8(qk, kb[:, None]).reshape(-1))
    width = _channel_widths(vb, lay)
    qv = unpack_codes(_section(payload, lay, "vq").reshape(L, 1, -1), width)[:, 0]
    _section(out, lay8, "vq").copy_(codes_to_int8(qv, width).reshape(-1))
    return out, lay8


# --- the CPU path: whole blobs through numba kernels -------------------------------------------

def from_int4a_blob(blob4a: Blob, lay4a: Layout, value_bits: float) -> tuple[bytearray, Layout]:
    """The int3 blob (header bytes left zero) of the page whose int4a blob is given (its header
    is not read), through one numba kernel: the CPU path of :func:`from_int4a`; raises
    CorruptPage on a bad int4a key map."""
    lay = int3_layout(lay4a, value_bits)
    buf = bytearray(HEADER_SIZE + lay.payload_nbytes)
    if k3.int3_from_int4a(_readonly(blob4a), np.frombuffer(buf, dtype=np.uint8),
                          *_plan(lay4a, lay)):
        raise CorruptPage(f"int4a key bit map holds widths outside 2..8 or does not spend "
                          f"the header's {lay4a.key_bits} bits a head", field="blob.kbits")
    return buf, lay


def to_int8_blob(blob: Blob, lay: Layout) -> tuple[bytearray, Layout]:
    """The int8 blob (header bytes left zero) that decodes to the page an int3 blob holds,
    through one numba kernel: the CPU path of :func:`to_int8`; raises CorruptPage on a bad
    map (as :func:`read_maps`)."""
    lay8 = int8_layout(lay)
    buf = bytearray(HEADER_SIZE + lay8.payload_nbytes)
    bad = k3.int3_to_int8(_readonly(blob), np.frombuffer(buf, dtype=np.uint8),
                          *_plan(lay, lay8))
    if bad:
        raise _bad_map(lay, "key" if bad == 1 else "value")
    return buf, lay8


def _readonly(blob: Blob) -> np.ndarray:
    a = np.frombuffer(blob, dtype=np.uint8)
    a.flags.writeable = False  # one compiled specialization whatever the caller passed
    return a


@functools.lru_cache(maxsize=256)
def _plan(src: Layout, dst: Layout) -> tuple[Any, ...]:
    return k3.plan(src, dst)


@functools.cache
def self_test() -> bool:
    """Run the int3 kernels once on a small page and check them against the torch code (this
    compiles them, or loads numba's cache); raises RuntimeError on a mismatch. Memoized: once
    per process."""
    from kvtier.codecs import torch_reference
    from kvtier.codecs.layout import layout_for_encode
    from kvtier.config import CodecConfig
    from kvtier.types import Page

    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 70, 2, 24, generator=g)
    k[..., 3] *= 20
    page = Page(k=k.half(), v=torch.randn(2, 70, 2, 24, generator=g).half(), start_position=0)
    params = CodecConfig()
    lay8 = layout_for_encode(Codec.INT8, "float16", page.shape, 0, params)
    p4a, lay4a = int4a.from_int8(torch_reference.encode_payload(page, lay8), lay8,
                                 params.key_bits, kernels=False)
    fast, lay = from_int4a(p4a, lay4a, params.int3_value_bits)
    slow, _ = from_int4a(p4a, lay4a, params.int3_value_bits, kernels=False)
    if not (torch.equal(fast, slow) and torch.equal(to_int8(fast, lay)[0],
                                                    to_int8(fast, lay, kernels=False)[0])):
        raise RuntimeError("int3 kernels disagree with the torch code (stale numba cache?)")
    return True
