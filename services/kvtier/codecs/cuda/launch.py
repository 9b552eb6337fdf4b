"""Host side of the device codec kernels: layouts to kernel arguments, scratch, launches.

Every function takes and returns device tensors (uint8 payloads laid out as
:mod:`kvtier.codecs.blob` describes, without the 64-byte header) and works on one page or a
batch of pages of one layout: ``k``/``v`` of ``[L, T, H, D]`` or ``[N, L, T, H, D]``,
payloads of ``[P]`` or ``[N, P]``. Launches go to the current CUDA stream and are not waited
for; callers synchronize when they hand the results to the host.

Importing this module imports Triton; :mod:`kvtier.codecs.device` imports it only once a
device page asks for it. Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors
(that is how the CPU tests hold them to the CPU kernels' bytes).
"""

from __future__ import annotations

import functools

import torch

from kvtier.codecs.blob import HEADER_SIZE
from kvtier.codecs.cuda import decode as dk
from kvtier.codecs.cuda import encode as ek
from kvtier.codecs.cuda import transcode as tk
from kvtier.codecs.grid import MANTISSAS
from kvtier.codecs.layout import Layout
from kvtier.pages import torch_dtype
from kvtier.types import DTYPES, Codec

# the squared step drops of int4a's key bit moves b -> b+1 (kvtier.codecs.int4a._DROP)
_DROP = tuple((255.0 / ((1 << b) - 1)) ** 2 - (255.0 / ((1 << (b + 1)) - 1)) ** 2
              for b in range(2, 8))
# launch options of every kernel: fp fusion off (see kvtier.codecs.cuda.numerics)
_OPTS = {"num_warps": 4, "enable_fp_fusion": False}
BT = 8  # token rows per tile
BC = 256  # channels (or bytes) per tile
VR = 16  # token rows of V an encode or decode program takes (a chunk of the layer)
CP = 16  # lanes that reduce the partial maxima of a layer's need
COPY_BLOCK = 1024


def vec_of(lay: Layout) -> int:
    """Elements of a page row the kernels may move in one instruction: the largest power of
    two, at most 16 bytes, dividing the head width ``D`` (so the row width ``H D``) and V's
    group length ``Gv`` (the kernels are told so through ``tl.multiple_of``; 8 for float16
    pages of a real model)."""
    vec = 16 // DTYPES[lay.dtype].itemsize
    while vec > 1 and (lay.D % vec or lay.Gv % vec):
        vec //= 2
    return vec


def _group_lanes(Gv: int) -> int:
    """Lanes of a V tile along a group's channels (a group is one or more such tiles)."""
    return min(max(16, _pow2(Gv)), BC)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _lanes(n: int) -> int:
    """Vector width for ``n`` lanes (a head's channels): at least 128, so that every head of
    up to 128 channels shares one compiled kernel (compiling costs seconds)."""
    return max(128, _pow2(n))


@functools.lru_cache(maxsize=16)
def _table(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale table's mantissas and int4a's step drops (float64) on ``device``."""
    return (torch.tensor(MANTISSAS, dtype=torch.float64, device=device),
            torch.tensor(_DROP, dtype=torch.float64, device=device))


def _off(lay: Layout, name: str) -> int:
    """Payload offset of a section (blob offset less the header)."""
    return lay.section(name)[0] - HEADER_SIZE


def _elements(t: torch.Tensor) -> torch.Tensor:
    """A page tensor as the kernels read it: bfloat16 as its int16 bits."""
    return t.view(torch.int16) if t.dtype is torch.bfloat16 else t


def _batched(t: torch.Tensor, lay: Layout) -> torch.Tensor:
    shape = (lay.L, lay.T, lay.H, lay.D)
    if tuple(t.shape) == shape:
        t = t.unsqueeze(0)
    if tuple(t.shape[1:]) != shape:
        raise ValueError(f"tensor of shape {list(t.shape)} does not match layout {shape}")
    return t


def _payloads(p: torch.Tensor, lay: Layout) -> torch.Tensor:
    p = p.unsqueeze(0) if p.dim() == 1 else p
    if p.dim() != 2 or p.shape[1] != lay.payload_nbytes or p.dtype != torch.uint8:
        raise ValueError(f"payload of shape {list(p.shape)} ({p.dtype}) does not match a "
                         f"layout of {lay.payload_nbytes} bytes")
    return p


def _kept(D: int, n_out: int) -> int:
    return D - n_out


@functools.lru_cache(maxsize=256)
def _unwritten(lay: Layout, written_exps: bool) -> tuple[int, ...]:
    """Payload offsets the kernels do not write: the alignment gaps between sections, and the
    ``exps`` section when the encoder skips it (every token a sink). They must be zero."""
    out: list[int] = []
    pos = 0  # payload offset up to which every byte is written or listed
    for name, off, n in lay.sections:  # in payload order
        if not n or (name == "exps" and not written_exps):
            continue
        out += range(pos, off - HEADER_SIZE)
        pos = off - HEADER_SIZE + n
    out += range(pos, lay.payload_nbytes)
    return tuple(out)


def new_payloads(n: int, lay: Layout, device: torch.device,
                 written_exps: bool = True) -> torch.Tensor:
    """``[n, P]`` uint8 payloads for the kernels to fill: uninitialised but for the bytes they
    do not write, which are zeroed (a memset of the whole would write half a page more)."""
    out = torch.empty(n, lay.payload_nbytes, dtype=torch.uint8, device=device)
    gaps = _unwritten(lay, written_exps)
    if gaps:
        out[:, _gap_index(lay, written_exps, device)] = 0
    return out


@functools.lru_cache(maxsize=256)
def _gap_index(lay: Layout, written_exps: bool, device: torch.device) -> torch.Tensor:
    return torch.tensor(_unwritten(lay, written_exps), dtype=torch.int64, device=device)


def encode(k: torch.Tensor, v: torch.Tensor, lay: Layout) -> torch.Tensor:
    """Payloads (uint8 ``[P]`` or ``[N, P]``) of int8 or int4 pages ``k``/``v``
    (contiguous, on one device, dtype as ``lay``; int4 with V groups of an even length, or
    one a row: :func:`supports`)."""
    if lay.codec is Codec.INT4A or not supports(lay):
        raise ValueError(f"device encode takes int8 and int4 layouts with even V groups, not "
                         f"{lay.codec.value} with groups of {lay.Gv}")
    kb, vb = _batched(k, lay), _batched(v, lay)
    out = new_payloads(kb.shape[0], lay, kb.device, written_exps=lay.Tq > 0)
    _encode(kb, vb, lay, out, lay.codec.bits, None)
    return out[0] if k.dim() == 4 else out


def encode_int4a(k: torch.Tensor, v: torch.Tensor, lay8: Layout, lay: Layout) -> torch.Tensor:
    """int4a payloads (layout ``lay``, built on ``lay8``'s grid) of pages ``k``/``v``, the
    bytes of :func:`int4a_from_int8` of their int8 payloads, without those payloads: the
    encode writes the sections both share and V's int4 codes straight into the int4a payload
    and K's int8 codes into scratch, which the key bits (:func:`int4a_bits` as in the
    transcode) then repack. Layouts :func:`supports` takes as int4 (even V groups)."""
    if lay.codec is not Codec.INT4A or not supports(lay):
        raise ValueError(f"int4a encode takes int4a layouts with even V groups, not "
                         f"{lay.codec.value} with groups of {lay.Gv}")
    kb, vb = _batched(k, lay8), _batched(v, lay8)
    N, dev = kb.shape[0], kb.device
    out = new_payloads(N, lay, dev, written_exps=lay.Tq > 0)
    q8 = torch.empty(N, max(1, lay.L * lay.Tq * lay.Ck), dtype=torch.uint8, device=dev)
    _encode(kb, vb, lay, out, 0, q8)
    if lay.Tq:
        bits = _key_bits(out, lay, lay, N, dev)
        _pack_keys(q8, q8.shape[1], 0, out, lay, bits, N, parts=1)
    return out[0] if k.dim() == 4 else out


def _encode(kb: torch.Tensor, vb: torch.Tensor, lay: Layout, out: torch.Tensor, bits: int,
            q8: torch.Tensor | None) -> None:
    """The launches of an encode into ``out`` (``BITS`` ``bits``; see
    :func:`kvtier.codecs.cuda.encode.encode_codes`)."""
    N = kb.shape[0]
    dev = kb.device
    L, T, S, H, D, n_out = lay.L, lay.T, lay.S, lay.H, lay.D, lay.n_out
    Tq, HD, Ck = lay.Tq, lay.HD, lay.Ck
    nk = lay.nk if Tq else 0
    nv = lay.nv
    rows = -(-Tq // VR)
    scr_stride = max(2 * nk * HD + 2 * Tq * nv, 1)
    scr_f = torch.empty(N * L, scr_stride, dtype=torch.float32, device=dev)
    top_stride = max(H, rows, 1)
    tops = torch.empty(N * L * 2, top_stride, dtype=torch.int64, device=dev)
    nk_all, nv_all = L * nk * Ck, L * Tq * nv
    m = torch.empty(N, max(1, nk_all + nv_all), dtype=torch.int32, device=dev)
    mant, _ = _table(dev)
    page_stride = L * T * HD
    kind = DTYPES[lay.dtype].code
    vec = vec_of(lay)
    gb = _group_lanes(lay.Gv)
    ek.encode_bounds[(N * L, 2, max(H, rows, 1))](
        _elements(kb), _elements(vb), page_stride, out, lay.payload_nbytes, scr_f, scr_stride,
        tops, top_stride, _off(lay, "oidx"), _off(lay, "sink"),
        L, T, S, H, D, n_out, lay.Gk, nk, lay.Gv, nv,
        KIND=kind, DP=_lanes(D), GB=gb, VEC=vec, BT=BT, VR=VR, **_OPTS)
    if not Tq:
        return
    q8_arg = m if q8 is None else q8  # unused unless bits == 0
    ek.encode_codes[(N * L, 2, max(nk * max(-(-Ck // BC), 1), rows, 1))](
        _elements(kb), _elements(vb), page_stride, out, lay.payload_nbytes, scr_f,
        scr_stride, tops, top_stride, m, m.shape[1], mant, q8_arg,
        0 if q8 is None else q8.shape[1],
        _off(lay, "oidx"), _off(lay, "exps"), _off(lay, "oraw"), _off(lay, "kb"),
        _off(lay, "vb"), _off(lay, "kq"), _off(lay, "vq"),
        L, T, S, H, D, n_out, lay.Gk, nk, lay.Gv, nv,
        KIND=kind, BITS=bits, GB=gb, VEC=vec, BT=BT, BC=BC, VR=VR, CP=CP, **_OPTS)
    pairs = (max(nk_all, nv_all) + 1) // 2
    if pairs:
        ek.pack_m12[(N, -(-pairs // COPY_BLOCK), 2)](
            m, m.shape[1], out, lay.payload_nbytes, _off(lay, "km"), _off(lay, "vm"),
            nk_all, nv_all, BLOCK=COPY_BLOCK, **_OPTS)


def supports(lay: Layout) -> bool:
    """Whether the kernels encode pages of ``lay`` (:func:`encode` int8 and int4,
    :func:`encode_int4a` int4a): int8 always; int4 and int4a where no byte of V's int4 codes
    holds codes of two groups (an even group length, or one group a row)."""
    return lay.codec is Codec.INT8 or (lay.codec in (Codec.INT4, Codec.INT4A)
                                       and (lay.Gv % 2 == 0 or lay.nv == 1))


def decode(payload: torch.Tensor, lay: Layout, k_out: torch.Tensor | None = None,
           v_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of int8, int4 or int4a payloads (``[P]`` or ``[N, P]``), written into
    ``k_out``/``v_out`` when given (contiguous, the page dtype, on the payload's device),
    else into new tensors. The payload must have passed the host checks
    (:func:`kvtier.codecs.layout.check_indices`, and for int4a the key bit map's).
    """
    single = payload.dim() == 1
    pb = _payloads(payload, lay)
    N = pb.shape[0]
    dev = pb.device
    dt = torch_dtype(lay.dtype)
    shape = (N, lay.L, lay.T, lay.H, lay.D)
    k = torch.empty(shape, dtype=dt, device=dev) if k_out is None else k_out.view(shape)
    v = torch.empty(shape, dtype=dt, device=dev) if v_out is None else v_out.view(shape)
    if lay.codec is Codec.NONE:
        k.view(N, -1).view(torch.uint8).copy_(pb[:, :pb.shape[1] // 2])
        v.view(N, -1).view(torch.uint8).copy_(pb[:, pb.shape[1] // 2:])
        return (k[0], v[0]) if single else (k, v)
    Tq = lay.Tq
    kbits = 0 if lay.codec is Codec.INT4A else lay.codec.bits
    mant, _ = _table(dev)
    o_kbits = _off(lay, "kbits") if lay.codec is Codec.INT4A else 0
    # int4a's K codes are read at per-channel bit offsets: half the channels a program keeps
    # its registers (and so the programs an SM holds) near the other codecs'
    kc = BC // 2 if lay.codec is Codec.INT4A else BC
    chunks = max(-(-lay.Ck // kc), -(-Tq // VR), 1) if Tq else 1
    dk.decode_page[(N * lay.L, 2, chunks)](
        pb, lay.payload_nbytes, _elements(k), _elements(v), lay.L * lay.T * lay.HD, mant,
        _off(lay, "oidx"), _off(lay, "exps"), _off(lay, "sink"), _off(lay, "oraw"),
        _off(lay, "kb"), _off(lay, "km"), _off(lay, "vb"), _off(lay, "vm"), o_kbits,
        _off(lay, "kq"), _off(lay, "vq"),
        lay.L, lay.T, lay.S, lay.H, lay.D, lay.n_out, lay.Gk if Tq else 1,
        lay.nk if Tq else 0, lay.Gv, lay.nv, lay.kq_row_bytes,
        KIND=DTYPES[lay.dtype].code, KBITS=kbits, VBITS=8 if lay.codec is Codec.INT8 else 4,
        VEC=vec_of(lay), BT=BT, BC=BC, KC=kc, VR=VR, GB=_group_lanes(lay.Gv), **_OPTS)
    return (k[0], v[0]) if single else (k, v)


def int4_from_int8(payload8: torch.Tensor, lay8: Layout, lay4: Layout) -> torch.Tensor:
    """int4 payloads of the pages whose int8 payloads are given: the codes
    ``round(q8 / 17)`` on the same grid, every other section copied."""
    single = payload8.dim() == 1
    src = _payloads(payload8, lay8)
    N = src.shape[0]
    out = new_payloads(N, lay4, src.device)
    spans = _spans_tensor(lay8, lay4, src.device)
    tk.int4_from_int8[(N * lay8.L, 3)](
        src, lay8.payload_nbytes, out, lay4.payload_nbytes, spans, spans.shape[0],
        _off(lay8, "kq"), _off(lay8, "vq"), _off(lay4, "kq"), _off(lay4, "vq"),
        lay8.L, lay8.Tq, lay8.Ck, lay8.HD, BT=BT, BC=BC, BLOCK=COPY_BLOCK, **_OPTS)
    return out[0] if single else out


def int4a_from_int8(payload8: torch.Tensor, lay8: Layout, lay: Layout) -> torch.Tensor:
    """int4a payloads (layout ``lay``, its key bit budget set) of the pages whose int8
    payloads are given: the same bytes as :func:`kvtier.codecs.int4a.from_int8`. Two
    launches: the key bits of every head, then the payloads."""
    single = payload8.dim() == 1
    src = _payloads(payload8, lay8)
    N = src.shape[0]
    out = new_payloads(N, lay, src.device)
    bits = _key_bits(src, lay8, lay, N, src.device)
    _pack_keys(src, lay8.payload_nbytes, _off(lay8, "kq"), out, lay, bits, N, parts=3,
               src8=(lay8, _off(lay8, "vq")))
    return out[0] if single else out


def _key_bits(src: torch.Tensor, lay8: Layout, lay: Layout, N: int,
              dev: torch.device) -> torch.Tensor:
    """The key bits of every (page, layer, kept channel), int32 ``[N L, C']``, from the grid
    of payloads ``src`` (int8 payloads, or int4a ones whose grid sections are written: the
    two layouts place them alike)."""
    L, H, D, n_out, Ck = lay.L, lay.H, lay.D, lay.n_out, lay.Ck
    lanes = _lanes(D)
    bits = torch.empty(N * L, max(Ck, 1), dtype=torch.int32, device=dev)
    scr_d = torch.empty(N * L * H, lanes, dtype=torch.float64, device=dev)
    mant, drop = _table(dev)
    tk.int4a_bits[(N * L, H)](
        src, src.shape[1], bits, bits.shape[1], scr_d, mant, drop,
        _off(lay8, "exps"), _off(lay8, "oidx"), _off(lay8, "oraw"), _off(lay8, "kb"),
        _off(lay8, "km"), L, lay.Tq, H, D, n_out, lay.nk if lay.Tq else 0,
        lay.Gk if lay.Tq else 1, lay.key_bits,
        KIND=DTYPES[lay.dtype].code, DP=lanes, BT=BT, **_OPTS)
    return bits


def _pack_keys(src: torch.Tensor, src_stride: int, o_kq8: int, out: torch.Tensor, lay: Layout,
               bits: torch.Tensor, N: int, parts: int,
               src8: tuple[Layout, int] | None = None) -> None:
    """:func:`kvtier.codecs.cuda.transcode.int4a_from_int8`: part 0 (K's codes, ``[L, T', C']``
    int8 at ``src`` + ``o_kq8``, repacked with ``bits``), and with ``parts`` 3 (``src`` int8
    payloads of ``src8``'s layout) parts 1 and 2 (V's codes requantized, the shared sections
    copied)."""
    L, H, D, n_out = lay.L, lay.H, lay.D, lay.n_out
    rb = lay.kq_row_bytes
    scr_i = torch.empty(N * L, lay.Ck + rb + 8, dtype=torch.int32, device=src.device)
    lay8, o_vq8 = src8 if src8 is not None else (lay, 0)
    spans = _spans_tensor(lay8, lay, src.device)
    tk.int4a_from_int8[(N * L, parts)](
        src, src_stride, out, lay.payload_nbytes, spans, spans.shape[0],
        bits, bits.shape[1], scr_i, scr_i.shape[1],
        o_kq8, o_vq8, _off(lay, "kbits"), _off(lay, "kq"),
        _off(lay, "vq"), L, lay.Tq, H, D, n_out, rb,
        BT=BT, BC=BC, BLOCK=COPY_BLOCK, **_OPTS)


@functools.lru_cache(maxsize=256)
def _spans_list(src: Layout, dst: Layout) -> tuple[tuple[int, int, int], ...]:
    """The sections both layouts hold but the codes, as (source, destination, bytes) payload
    offsets, runs without padding between them merged."""
    rows: list[list[int]] = []
    for name, off, n in dst.sections:
        if name in ("kq", "vq", "kbits") or not n:
            continue
        a = src.section(name)[0] - HEADER_SIZE
        b = off - HEADER_SIZE
        if rows and rows[-1][0] + rows[-1][2] == a and rows[-1][1] + rows[-1][2] == b:
            rows[-1][2] += n
        else:
            rows.append([a, b, n])
    return tuple((a, b, n) for a, b, n in rows)


@functools.lru_cache(maxsize=256)
def _spans_tensor(src: Layout, dst: Layout, device: torch.device) -> torch.Tensor:
    rows = _spans_list(src, dst) or ((0, 0, 0),)
    return torch.tensor(rows, dtype=torch.int64, device=device).reshape(-1, 3)
