"""int4a: 4 bits per element on average, with the key bits allocated per channel.

Keys carry most of the 4-bit error (the evaluation's ablation), and their channels are very
unequal: a few are tens of times wider than the rest, and queries are large in the same
channels, so a key channel's error moves the logits ``q . k`` in proportion to both. int4a keeps
the int8 blob's grid (groups of tokens per channel, scales, minima, sinks, outlier channels) and
gives each quantized key channel of a (layer, head) 2..8 bits, 4 on average by default, by
greedy reverse water-filling (:func:`allocate`) on ``w_c * e_b``: ``e_b = (255 / (2^b - 1))^2``
is the squared step of ``b`` bits in int8 steps, and the weight is page-local, no calibration::

    w_c = sum_g n_g s_g^2  *  max(|k_c|, |k_c'|)^2

the squared int8 scales of the channel's groups (``n_g`` tokens each: its error at a given
width), times the squared peak of the key's rotary pair (``c' = c +- head_dim / 2``; RoPE
mixes the pair by position), a proxy for the query energy the daemon never sees: the channels
where keys are large are those where queries are large (``docs/quality.md`` compares it with
other weights, calibrated query energy included). Values are int4 on the int8 grid, as in the
int4 codec.

The codes are integer functions of the int8 codes: ``q_b = round(q8 (2^b - 1) / 255)`` and back
``q8' = round(q_b 255 / (2^b - 1))`` (neither has ties), exact for 2, 4 and 8 bits and within
half an int8 step of the uniform ``b``-bit grid otherwise. So an int4a blob is a function of
the int8 blob of the same page: :func:`from_int8` is both the encoder (after the int8 encoder)
and the transcode rule from the warm tier, with the same bytes either way, and decoding maps
the codes back (:func:`to_int8`) and runs the int8 decoder. A key value's error is at most
``(255 / (2^b - 1) / 2 + 1) s``.

Payload: the int4 sections, with one more (``kbits``, before ``kq``)::

    kbits  u4  [L, C']          bits of each quantized K channel (2..8), nibbles as int4 packs
    kq     bits[L, T', H kb]    K codes: a token row is a little-endian bit string, channel c's
                                code at bit sum(bits[:c]); ceil(H kb / 8) bytes a row

``kb`` is the header's ``key_bits``: the code bits a token spends per head,
``round(CodecConfig.key_bits * (head_dim - outliers))`` (4 bits a channel by default, so a row
is as long as int4's). Every (layer, head) spends exactly that, so the blob's size follows from
its header alone; the decoder checks the map's widths and its sum per layer before using it.
The allocation runs in float64; on CUDA a near-tie may resolve differently than on the CPU
(both blobs are valid). The allocation and the code maps run as numba kernels on the CPU
(:mod:`kvtier.codecs.cpu.int4a`) and as the torch code here on any device.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import numpy as np
import torch

from kvtier.codecs import grid
from kvtier.codecs.blob import HEADER_SIZE
from kvtier.codecs.cpu import int4a as kernels
from kvtier.codecs.cpu.intrinsics import FAST_BMI2
from kvtier.codecs.layout import QUANTIZED_SECTIONS, Layout, make_layout
from kvtier.codecs.pack import pack_int4, unpack_int4, unpack_m12
from kvtier.errors import CorruptPage
from kvtier.pages import torch_dtype
from kvtier.types import DTYPES, Codec

Blob = bytes | bytearray | memoryview

KEY_BITS = tuple(range(2, 9))
# the squared step of a code of b bits, in int8 steps: (255 / (2^b - 1))^2
_ERR = {b: (255.0 / ((1 << b) - 1)) ** 2 for b in range(1, 9)}
_DROP = np.array([_ERR[b] - _ERR[b + 1] for b in range(KEY_BITS[0], KEY_BITS[-1])])
_MANT = np.array(grid.MANTISSAS, dtype=np.float64)


def allocate(w: torch.Tensor, budget: int) -> torch.Tensor:
    """Bits (uint8, 2..8) per channel of ``w`` (float64 ``[..., n]``, >= 0), ``budget`` a row.

    Greedy reverse water-filling on the squared error ``w * e_b``: every channel starts at 2
    bits and the ``budget - 2 n`` one-bit moves that remove the most error are taken. A
    channel's gains fall with each bit, so the best moves are each channel's first ones in
    order (ties go to the earlier move: moves are listed bit by bit and sorted stably). Every
    row spends exactly ``budget`` bits (``2 n <= budget <= 8 n``).
    """
    n = w.shape[-1]
    lo, hi = KEY_BITS[0], KEY_BITS[-1]
    drop = torch.tensor([_ERR[b] - _ERR[b + 1] for b in range(lo, hi)], dtype=w.dtype,
                        device=w.device)
    gains = (w.unsqueeze(-2) * drop[:, None]).flatten(-2)  # moves b -> b+1, bit by bit
    order = torch.sort(gains, dim=-1, descending=True, stable=True).indices
    take = torch.zeros_like(gains, dtype=torch.uint8)
    take.scatter_(-1, order[..., :budget - lo * n], 1)
    per_move = take.reshape(*w.shape[:-1], hi - lo, n)
    bits: torch.Tensor = per_move.sum(-2, dtype=torch.uint8) + lo
    return bits


def head_budget(key_bits: float, kept: int) -> int:
    """K code bits per token of one head: ``key_bits`` a quantized channel on average."""
    return max(KEY_BITS[0] * kept, min(KEY_BITS[-1] * kept, round(key_bits * kept)))


def codes_from_int8(q8: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """int8 codes -> codes of ``bits`` (broadcast): ``round(q8 (2^b - 1) / 255)``."""
    lv = (1 << bits.to(torch.int32)) - 1
    return ((2 * q8.to(torch.int32) * lv + 255) // 510).to(torch.uint8)


def codes_to_int8(qb: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Codes of ``bits`` -> the int8 codes they stand for: ``round(q 255 / (2^b - 1))``."""
    lv = (1 << bits.to(torch.int32)) - 1
    return ((510 * qb.to(torch.int32) + lv) // (2 * lv)).to(torch.uint8)


def _row_plan(bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For bits ``[L, C']``: each channel's byte and shift in a token row."""
    width = bits.to(torch.int64)
    off = width.cumsum(-1) - width
    return off >> 3, off & 7


def pack_codes(q: torch.Tensor, bits: torch.Tensor, row_bytes: int) -> torch.Tensor:
    """Codes ``[L, T, C']`` (each below ``2**bits`` of its channel) -> rows ``[L, T, row_bytes]``.

    A code may straddle two bytes (widths 3, 5, 7, or any after them), never three.
    """
    L, T, C = q.shape
    byte, shift = _row_plan(bits)
    vals = q.to(torch.int32) << shift[:, None].to(torch.int32)
    out = torch.zeros(L, T, row_bytes + 1, dtype=torch.int32, device=q.device)
    idx = byte[:, None].expand(L, T, C)
    out.scatter_add_(2, idx, vals & 0xFF)  # codes never overlap: add = or
    out.scatter_add_(2, idx + 1, vals >> 8)
    return out[..., :row_bytes].to(torch.uint8)


def unpack_codes(rows: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Rows ``[L, T, row_bytes]`` -> codes ``[L, T, C']`` (uint8)."""
    L, T, _ = rows.shape
    C = bits.shape[-1]
    byte, shift = _row_plan(bits)
    padded = torch.nn.functional.pad(rows, (0, 1)).to(torch.int32)
    idx = byte[:, None].expand(L, T, C)
    word = padded.gather(2, idx) | (padded.gather(2, idx + 1) << 8)
    mask = (1 << bits.to(torch.int32)) - 1
    return ((word >> shift[:, None].to(torch.int32)) & mask[:, None]).to(torch.uint8)


def int4a_layout(lay8: Layout, key_bits: float) -> Layout:
    """The int4a layout of the page an int8 layout describes (same grid, sinks, outliers),
    ``key_bits`` per quantized K channel on average."""
    return make_layout(Codec.INT4A, lay8.dtype, (lay8.L, lay8.T, lay8.H, lay8.D), lay8.S,
                       lay8.n_out, lay8.group_size, head_budget(key_bits, lay8.D - lay8.n_out))


def int8_layout(lay: Layout) -> Layout:
    """The int8 layout an int4a layout expands to."""
    return make_layout(Codec.INT8, lay.dtype, (lay.L, lay.T, lay.H, lay.D), lay.S, lay.n_out,
                       lay.group_size)


def _section(payload: torch.Tensor, lay: Layout, name: str) -> torch.Tensor:
    off, n = lay.section(name)
    return payload[off - HEADER_SIZE: off - HEADER_SIZE + n]


def key_weights(payload8: torch.Tensor, lay8: Layout) -> torch.Tensor:
    """``[L, H, D']`` float64: each quantized K channel's weight (see the module docstring).

    Read from the grid alone (and the outlier channels' raw values), not the codes: a group's
    grid spans ``[m s, (m + 255) s]``, which holds its values with at most a few steps of slack.
    """
    L, Tq, H, D, nk, C = lay8.L, lay8.Tq, lay8.H, lay8.D, lay8.nk, lay8.Ck
    e0 = _section(payload8, lay8, "exps").view(torch.int16).reshape(L, 2)[:, 0].to(torch.int64)
    s = grid.scales(e0, _section(payload8, lay8, "kb").reshape(L, nk * C)).double()
    m = unpack_m12(_section(payload8, lay8, "km"), L * nk * C).reshape(L, nk * C).double()
    s, m = s.reshape(L, nk, C), m.reshape(L, nk, C)
    n_g = torch.bincount(torch.arange(Tq, device=s.device) // lay8.Gk, minlength=nk).double()
    step2 = torch.zeros_like(s[:, 0])  # [L, C']; group by group, as the CPU kernel adds
    for g in range(nk):
        step2 = step2 + s[:, g].square() * n_g[g]
    reach = torch.maximum((m * s).abs(), ((m + 255) * s).abs()).amax(1)  # [L, C']
    peak = torch.zeros(L, H * D, dtype=torch.float64, device=s.device)
    oidx = _section(payload8, lay8, "oidx").view(torch.int16).reshape(L, H, lay8.n_out)
    kidx = _kept(oidx.to(torch.int64), H, D)
    peak.scatter_(1, kidx, reach)
    if lay8.n_out:
        raw = _section(payload8, lay8, "oraw").view(torch_dtype(lay8.dtype))
        o_peak = raw.reshape(L, Tq, H, lay8.n_out).double().abs().amax(1)
        flat = oidx.to(torch.int64) + (torch.arange(H, device=s.device) * D)[None, :, None]
        peak.scatter_(1, flat.reshape(L, -1), o_peak.reshape(L, -1))
    peak = peak.reshape(L, H, D)
    if D % 2 == 0:  # the rotary pair shares its peak: RoPE turns one into the other
        pair = torch.maximum(peak[..., :D // 2], peak[..., D // 2:])
        peak = torch.cat((pair, pair), dim=-1)
    w = step2 * peak.reshape(L, H * D).gather(1, kidx).square()
    return w.reshape(L, H, D - lay8.n_out)


def _kept(oidx: torch.Tensor, H: int, D: int) -> torch.Tensor:
    """``[L, C']`` flat (head * D + dim) indices of the quantized K channels, ascending."""
    mask = torch.ones(oidx.shape[0], H, D, dtype=torch.bool, device=oidx.device)
    mask.scatter_(2, oidx, False)
    return mask.reshape(oidx.shape[0], H * D).nonzero()[:, 1].reshape(oidx.shape[0], -1)


def _common(src: torch.Tensor, src_lay: Layout, dst_lay: Layout) -> torch.Tensor:
    """A zeroed payload under ``dst_lay`` with every section but the codes (grid, sinks,
    outliers) copied from ``src`` (int8 <-> int4a)."""
    dst = torch.zeros(dst_lay.payload_nbytes, dtype=torch.uint8, device=src.device)
    for name, _, n in dst_lay.sections:
        if name not in ("kq", "vq", "kbits"):
            off = dst_lay.section(name)[0] - HEADER_SIZE
            dst[off:off + n] = _section(src, src_lay, name)
    return dst


def from_int8(payload8: torch.Tensor, lay8: Layout, key_bits: float, *,
              kernels: bool = True) -> tuple[torch.Tensor, Layout]:
    """The int4a payload (uint8, same device) of the page whose int8 payload is given
    (through the numba kernels on the CPU unless ``kernels`` is False)."""
    if kernels and _fast(payload8):
        buf, lay = from_int8_blob(bytearray(HEADER_SIZE) + payload8.numpy().tobytes(), lay8,
                                  key_bits)
        return torch.frombuffer(buf, dtype=torch.uint8)[HEADER_SIZE:], lay
    lay = int4a_layout(lay8, key_bits)
    out = _common(payload8, lay8, lay)
    if lay.Tq == 0:
        return out, lay
    L, Tq, C = lay.L, lay.Tq, lay.Ck
    # per (layer, head); one budget per layer measured the same (KL 0.00120 against 0.00126,
    # top-1 98.55% against 98.66% on 2,048 tokens), and the decoder checks only the layer sum
    bits = allocate(key_weights(payload8, lay8), lay.key_bits).reshape(L, C)
    _section(out, lay, "kbits").copy_(pack_int4(bits).reshape(-1))
    kq8, kq = _section(payload8, lay8, "kq"), _section(out, lay, "kq")
    vq8, vq = _section(payload8, lay8, "vq"), _section(out, lay, "vq")
    qk = codes_from_int8(kq8.reshape(L, Tq, C), bits[:, None])
    kq.copy_(pack_codes(qk, bits, lay.kq_row_bytes).reshape(-1))
    q4v = ((vq8.reshape(L * Tq, lay.HD).to(torch.int32) + 8) // 17).to(torch.uint8)
    vq.copy_(pack_int4(q4v).reshape(-1))  # int8 -> int4, as transcode does
    return out, lay


def read_bits(payload: torch.Tensor, lay: Layout) -> torch.Tensor:
    """The checked bit map ``[L, C']`` (uint8) of an int4a payload; raises CorruptPage."""
    bits = unpack_int4(_section(payload, lay, "kbits").reshape(lay.L, -1), lay.Ck)
    per_layer = bits.to(torch.int64).sum(-1)
    if bool(((bits < KEY_BITS[0]) | (bits > KEY_BITS[-1])).any()) or \
            bool((per_layer != lay.H * lay.key_bits).any()):
        raise _bad_map(lay)
    return bits


def _bad_map(lay: Layout) -> CorruptPage:
    return CorruptPage(f"key bit map holds widths outside {KEY_BITS[0]}..{KEY_BITS[-1]} or "
                       f"does not spend the header's {lay.key_bits} bits a head",
                       field="blob.kbits")


def to_int8(payload: torch.Tensor, lay: Layout, *,
            kernels: bool = True) -> tuple[torch.Tensor, Layout]:
    """The int8 payload (uint8, same device) that decodes to the page an int4a payload holds
    (through the numba kernels on the CPU unless ``kernels`` is False)."""
    if kernels and _fast(payload):
        buf, lay8 = to_int8_blob(bytearray(HEADER_SIZE) + payload.numpy().tobytes(), lay)
        return torch.frombuffer(buf, dtype=torch.uint8)[HEADER_SIZE:], lay8
    lay8 = int8_layout(lay)
    out = _common(payload, lay, lay8)
    if lay.Tq == 0:
        return out, lay8
    L, Tq = lay.L, lay.Tq
    bits = read_bits(payload, lay)
    kq, kq8 = _section(payload, lay, "kq"), _section(out, lay8, "kq")
    vq, vq8 = _section(payload, lay, "vq"), _section(out, lay8, "vq")
    qk = unpack_codes(kq.reshape(L, Tq, -1), bits)
    kq8.copy_(codes_to_int8(qk, bits[:, None]).reshape(-1))
    q4v = unpack_int4(vq.reshape(L * Tq, -1), lay.HD)
    vq8.copy_((q4v.to(torch.int32) * 17).to(torch.uint8).reshape(-1))
    return out, lay8


class _Plan(NamedTuple):
    """What the whole-blob kernels take for one pair of layouts (int8, int4a)."""

    lay: Layout  # the layout the kernel writes
    spans: np.ndarray  # [n, 3] int64: grid bytes to copy (source offset, destination, bytes)
    sec: np.ndarray  # int64 section offsets (see the kernel)
    geo: np.ndarray  # int64 geometry (see the kernel)


def _spans(src: Layout, dst: Layout) -> np.ndarray:
    """The sections both layouts hold but the codes, as copy spans, runs without padding
    between them merged."""
    rows: list[list[int]] = []
    for name, off, n in dst.sections:
        if name in ("kq", "vq", "kbits") or not n:
            continue
        a = src.section(name)[0]
        if rows and rows[-1][0] + rows[-1][2] == a and rows[-1][1] + rows[-1][2] == off:
            rows[-1][2] += n
        else:
            rows.append([a, off, n])
    return _frozen(rows, (len(rows), 3))


def _frozen(values: list[Any], shape: tuple[int, ...]) -> np.ndarray:
    a = np.array(values, dtype=np.int64).reshape(shape)
    a.flags.writeable = False
    return a


@functools.lru_cache(maxsize=256)
def _plan_from8(lay8: Layout, key_bits: float) -> _Plan:
    lay = int4a_layout(lay8, key_bits)
    o8, o = lay8.offsets, lay.offsets
    sec = [o8[n][0] for n in ("exps", "oidx", "oraw", "kb", "km", "kq", "vq")] + \
        [o[n][0] for n in ("kbits", "kq", "vq")]
    geo = [lay.L, lay.Tq, lay.H, lay.D, lay.n_out, lay.nk, lay.Gk, DTYPES[lay.dtype].code,
           lay.key_bits, lay.kq_row_bytes]
    return _Plan(lay, _spans(lay8, lay), _frozen(sec, (-1,)), _frozen(geo, (-1,)))


@functools.lru_cache(maxsize=256)
def _plan_to8(lay: Layout) -> _Plan:
    lay8 = int8_layout(lay)
    o8, o = lay8.offsets, lay.offsets
    sec = [o[n][0] for n in ("kbits", "kq", "vq")] + [o8[n][0] for n in ("kq", "vq")]
    geo = [lay.L, lay.Tq, lay.H, lay.D, lay.n_out, lay.key_bits, lay.kq_row_bytes]
    return _Plan(lay8, _spans(lay, lay8), _frozen(sec, (-1,)), _frozen(geo, (-1,)))


@functools.lru_cache(maxsize=256)
def page_plan(lay: Layout) -> tuple[np.ndarray, np.ndarray]:
    """What the fused CPU decoder (``kvtier.codecs.cpu.int4a.decode_page``) takes for an
    int4a layout: section bounds in ``QUANTIZED_SECTIONS`` order then ``kbits``', and the
    geometry (dtype kind, L, T, S, H, D, outliers, Gk, Gv, key bits a head, K row bytes)."""
    o = lay.offsets
    bounds = [x for name in (*QUANTIZED_SECTIONS, "kbits")
              for x in (o[name][0], o[name][0] + o[name][1])]
    geo = [DTYPES[lay.dtype].code, lay.L, lay.T, lay.S, lay.H, lay.D, lay.n_out, lay.Gk,
           lay.Gv, lay.key_bits, lay.kq_row_bytes]
    return _frozen(bounds, (-1,)), _frozen(geo, (-1,))


def _readonly(blob: Blob) -> np.ndarray:
    a = np.frombuffer(blob, dtype=np.uint8)
    a.flags.writeable = False  # one compiled specialization whatever the caller passed
    return a


def from_int8_blob(blob8: Blob, lay8: Layout, key_bits: float) -> tuple[bytearray, Layout]:
    """The int4a blob (header bytes left zero) of the page whose int8 blob is given (its
    header is not read), through one numba kernel: the CPU path of :func:`from_int8`."""
    plan = _plan_from8(lay8, key_bits)
    buf = bytearray(HEADER_SIZE + plan.lay.payload_nbytes)
    kernels.int4a_from_int8(_readonly(blob8), np.frombuffer(buf, dtype=np.uint8),
                                  plan.spans, plan.sec, plan.geo, _MANT, _DROP,
                                  kernels.TO_B, FAST_BMI2)
    return buf, plan.lay


def to_int8_blob(blob: Blob, lay: Layout) -> tuple[bytearray, Layout]:
    """The int8 blob (header bytes left zero) that decodes to the page an int4a blob holds,
    through one numba kernel: the CPU path of :func:`to_int8`; raises CorruptPage on a bad
    bit map (as :func:`read_bits`)."""
    plan = _plan_to8(lay)
    buf = bytearray(HEADER_SIZE + plan.lay.payload_nbytes)
    if kernels.int4a_to_int8(_readonly(blob), np.frombuffer(buf, dtype=np.uint8),
                                   plan.spans, plan.sec, plan.geo, kernels.TO_8):
        raise _bad_map(lay)
    return buf, plan.lay


def _allocate_kernel(payload8: torch.Tensor, lay8: Layout, budget: int) -> torch.Tensor:
    """:func:`key_weights` then :func:`allocate` in one numba kernel (the same numbers)."""
    L, Tq, H, D, n_out = lay8.L, lay8.Tq, lay8.H, lay8.D, lay8.n_out
    e0 = _section(payload8, lay8, "exps").view(torch.int16).reshape(L, 2)[:, 0].numpy()
    oidx = _section(payload8, lay8, "oidx").view(torch.int16).numpy().astype(np.int64)
    opeak = np.zeros(L * H * n_out)
    if n_out:
        raw = _section(payload8, lay8, "oraw").view(torch_dtype(lay8.dtype))
        opeak = raw.reshape(L, Tq, H, n_out).double().abs().amax(1).reshape(-1).numpy()
    out = np.empty(L * lay8.Ck, np.uint8)
    kernels.allocate_keys(
        _section(payload8, lay8, "kb").numpy(), _section(payload8, lay8, "km").numpy(),
        e0.astype(np.int64), _MANT, L, lay8.nk, lay8.Gk, Tq, H, D, n_out, oidx, opeak, _DROP,
        budget, out)
    return torch.from_numpy(out).reshape(L, lay8.Ck)


def _fast(t: torch.Tensor) -> bool:
    """Whether the numba kernels take the code maps (CPU tensors)."""
    return t.device.type == "cpu"



@functools.cache
def self_test() -> bool:
    """Run the int4a kernels once on a small random int8 payload and check them against the
    torch code (this compiles them, or loads numba's cache); raises RuntimeError on a
    mismatch. Memoized: once per process."""
    g = torch.Generator().manual_seed(0)
    lay8 = make_layout(Codec.INT8, "float16", (2, 70, 2, 24), 0, 1, 64)
    payload8 = torch.randint(0, 256, (lay8.payload_nbytes,), dtype=torch.uint8, generator=g)
    _section(payload8, lay8, "oidx").view(torch.int16).fill_(3)
    _section(payload8, lay8, "exps").view(torch.int16).fill_(-20)
    _section(payload8, lay8, "oraw").zero_()  # finite values in the page dtype
    fast, lay = from_int8(payload8, lay8, 4.3)
    slow, _ = from_int8(payload8, lay8, 4.3, kernels=False)
    if not (torch.equal(fast, slow) and torch.equal(to_int8(fast, lay)[0],
                                                    to_int8(fast, lay, kernels=False)[0])):
        raise RuntimeError("int4a kernels disagree with the torch code (stale numba cache?)")
    return True
