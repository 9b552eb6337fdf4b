"""encode / decode / transcode: the codec API the store, transport and eval layers call.

Pure functions of their arguments, safe to call from many threads at once. CPU pages go
through the numba kernels of :mod:`kvtier.codecs.cpu`; pages on an accelerator go through
:mod:`kvtier.codecs.device`: the Triton kernels on a CUDA device where Triton runs, else the
pure-torch code of :mod:`kvtier.codecs.torch_reference` on the device, which is also the oracle
the kernels are tested against. All produce the same bytes. int4a is built from the int8
payload of the page and decoded through an int8 payload (:mod:`kvtier.codecs.int4a`), so it
uses the same two paths.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass

import torch

from kvtier.codecs import blob as blobfmt
from kvtier.codecs import device as accel
from kvtier.codecs import int3, int4a, torch_reference
from kvtier.codecs.blob import HEADER_SIZE, BlobHeader, verify
from kvtier.codecs.cpu import backend as cpu
from kvtier.codecs.cpu import kernels_cached
from kvtier.codecs.layout import (
    Layout, check_indices, layout_for_encode, layout_of, make_layout,
)
from kvtier.config import CodecConfig
from kvtier.errors import CorruptPage, InvalidArgument
from kvtier.pages import dtype_name
from kvtier.types import Codec, Page, Precision

log = logging.getLogger(__name__)

Blob = bytes | bytearray | memoryview
_CODEC_PRECISION = {c: Precision.of_codec(c) for c in Codec}  # of_codec builds a dict per call
_CPU = torch.device("cpu")


@dataclass(frozen=True, slots=True)
class Decoded:
    """A decoded page, the codec it was stored with and the lowest precision it went through."""

    page: Page
    codec: Codec
    precision: Precision


def _check_codec(codec: object, field: str) -> Codec:
    if not isinstance(codec, Codec):
        raise InvalidArgument(f"{codec!r} is not a codec; use one of "
                              f"{', '.join(c.value for c in Codec)}", field=field)
    return codec


def encode(page: Page, codec: Codec, params: CodecConfig, *,
           precision: Precision | None = None) -> bytes:
    """Encode ``page`` into a self-describing, checksummed blob (host bytes).

    ``precision`` is the lowest precision the page already passed through (a page promoted
    out of int4 and re-encoded with ``none`` stays INT4); the blob records the lower of it and
    the codec's own. Page tensors may live on any device. Values must be finite (as
    :func:`kvtier.pages.make_page` enforces): the grid of a group holding NaN or Inf is
    undefined, and checking here would cost a pass over every page.
    """
    codec = _check_codec(codec, "codec")
    if not isinstance(page, Page):
        raise InvalidArgument(f"expected a Page, got {type(page).__name__}", field="page")
    if not isinstance(params, CodecConfig):
        raise InvalidArgument(f"expected CodecConfig, got {type(params).__name__}",
                              field="params")
    # every tensor attribute costs 0.05-0.2 us: each is read once (a 64 KiB page's encode
    # is about 30 us, of which the kernel is 21)
    k, v, start = page.k, page.v, page.start_position
    shape = k.shape
    if shape != v.shape or k.dtype != v.dtype or len(shape) != 4:
        raise InvalidArgument("k and v must share one 4-D shape and dtype", field="page")
    device = k.device
    if device != v.device:
        raise InvalidArgument("k and v must be on one device", field="page")
    if 0 in shape:
        raise InvalidArgument(f"page has a zero-size dimension: {list(shape)}",
                              field="page.shape")
    if not 0 <= start < 1 << 63:
        raise InvalidArgument(f"start_position must be >= 0, got {start}",
                              field="start_position")
    if k.requires_grad or v.requires_grad:
        page = Page(k=k.detach(), v=v.detach(), start_position=start)
    dtype = dtype_name(k.dtype)
    prec = _CODEC_PRECISION[codec]
    if precision is not None:
        prec = min(prec, Precision(precision))
    kernels = _kernels_run_on(device)
    if codec is Codec.INT3:
        return _int3_encode(page, layout_for_encode(Codec.INT8, dtype, shape, start, params),
                            params, prec, kernels)
    if codec is Codec.INT4A:
        lay8 = layout_for_encode(Codec.INT8, dtype, shape, start, params)
        h8 = _header(Codec.INT8, page, lay8, params, prec)
        if kernels:
            buf8 = bytearray(HEADER_SIZE + lay8.payload_nbytes)
            cpu.encode_into(page, lay8, buf8)
            return _int4a_seal(int4a.from_int8_blob(buf8, lay8, params.key_bits), h8)
        if accel.available(device):
            payload, lay4a = accel.int4a_payload(page, lay8, params.key_bits)
            return _int4a_seal((bytearray(HEADER_SIZE) + payload.cpu().numpy().tobytes(), lay4a),
                               h8)
        return _int4a_blob(h8, torch_reference.encode_payload(page, lay8), lay8, params)
    lay = layout_for_encode(codec, dtype, shape, start, params)
    if kernels:  # header packed in place: no BlobHeader per page
        buf = bytearray(HEADER_SIZE + lay.payload_nbytes)  # zeroed: padding stays zero
        blobfmt.pack_header_into(buf, codec, dtype, (lay.L, lay.T, lay.H, lay.D), start, prec,
                                 params.group_size, lay.S, lay.n_out, lay.payload_nbytes)
        cpu.encode_into(page, lay, buf)
    else:
        buf = blobfmt.pack_header(_header(codec, page, lay, params, prec))
        buf.extend(accel.encode_payload(page, lay).cpu().numpy().tobytes())
    return blobfmt.seal(buf)


def _kernels_run_on(device: torch.device) -> bool:
    """Whether the numba kernels do the work for tensors on ``device``: on the CPU they do;
    on an accelerator :mod:`kvtier.codecs.device` runs on the device itself. Blobs are host
    bytes, so ``transcode`` always runs the numba kernels."""
    return device.type == "cpu"


def _header(codec: Codec, page: Page, lay: Layout, params: CodecConfig,
            prec: Precision) -> BlobHeader:
    return BlobHeader(
        codec=codec, dtype=lay.dtype, shape=page.shape, start_position=page.start_position,
        precision=prec, nbytes=HEADER_SIZE + lay.payload_nbytes, group_size=params.group_size,
        sink_tokens=lay.S, outliers=lay.n_out, payload_nbytes=lay.payload_nbytes, checksum=0,
    )


def _int4a_blob(h8: BlobHeader, payload8: torch.Tensor, lay8: Layout,
                params: CodecConfig) -> bytes:
    """The sealed int4a blob of the page whose int8 header and payload are given (the torch
    path: any device)."""
    payload, lay = int4a.from_int8(payload8, lay8, params.key_bits, kernels=False)
    buf = bytearray(HEADER_SIZE)
    buf.extend(payload.cpu().numpy().tobytes())
    return _int4a_seal((buf, lay), h8)


def _int4a_seal(blob: tuple[bytearray, Layout], h8: BlobHeader) -> bytes:
    """Pack the int4a header (from the int8 one of the page) into ``blob``'s buffer, seal it."""
    buf, lay = blob
    blobfmt.pack_header_into(buf, Codec.INT4A, h8.dtype, h8.shape, h8.start_position,
                             min(h8.precision, Precision.INT4), h8.group_size, h8.sink_tokens,
                             h8.outliers, lay.payload_nbytes, key_bits=lay.key_bits)
    return blobfmt.seal(buf)


def _int3_encode(page: Page, lay8: Layout, params: CodecConfig, prec: Precision,
                 kernels: bool) -> bytes:
    """The sealed int3 blob of ``page``: the int8 encoder, int4a's map, then int3's."""
    h8 = _header(Codec.INT8, page, lay8, params, prec)
    if kernels:
        buf8 = bytearray(HEADER_SIZE + lay8.payload_nbytes)
        cpu.encode_into(page, lay8, buf8)
        buf4a, lay4a = int4a.from_int8_blob(buf8, lay8, params.key_bits)
        return _int3_seal(int3.from_int4a_blob(buf4a, lay4a, params.int3_value_bits), h8)
    if accel.available(page.k.device):
        payload4a, lay4a = accel.int4a_payload(page, lay8, params.key_bits)
    else:
        payload4a, lay4a = int4a.from_int8(torch_reference.encode_payload(page, lay8), lay8,
                                           params.key_bits, kernels=False)
    payload, lay = int3.from_int4a(payload4a, lay4a, params.int3_value_bits, kernels=False)
    return _int3_seal((bytearray(HEADER_SIZE) + payload.cpu().numpy().tobytes(), lay), h8)


def _int3_seal(blob: tuple[bytearray, Layout], h: BlobHeader) -> bytes:
    """Pack the int3 header (from the int8 or int4a one of the page) into ``blob``'s buffer,
    seal it."""
    buf, lay = blob
    blobfmt.pack_header_into(buf, Codec.INT3, h.dtype, h.shape, h.start_position,
                             min(h.precision, Precision.INT3), h.group_size, h.sink_tokens,
                             h.outliers, lay.payload_nbytes, key_bits=lay.key_bits,
                             value_bits=lay.value_bits)
    return blobfmt.seal(buf)


def _layout_checked(h: BlobHeader) -> Layout:
    lay = layout_of(h)
    if lay.payload_nbytes != h.payload_nbytes:
        raise CorruptPage(f"payload is {h.payload_nbytes} bytes, the header's geometry needs "
                          f"{lay.payload_nbytes}", field="blob.length")
    return lay


def decode(blob: Blob, device: torch.device | None = None) -> Decoded:
    """Verify and decode a blob into a page on ``device`` (CPU by default).

    Raises :class:`~kvtier.errors.CorruptPage` on a bad magic, header or checksum; a blob
    that does not verify is never decoded, so garbage is never returned.
    """
    h = verify(blob)
    lay = _layout_checked(h)
    dev = _CPU if device is None else torch.device(device)
    mv = memoryview(blob)
    try:
        if lay.codec is Codec.INT4A:
            k, v = _decode_int4a(blob, lay, dev)
        elif lay.codec is Codec.INT3:
            k, v = _decode_int3(blob, lay, dev)
        elif _kernels_run_on(dev):
            k, v = cpu.decode(mv, lay)  # checks the indices it uses itself
        else:
            check_indices(blob, lay)
            payload = torch.frombuffer(bytearray(mv[HEADER_SIZE:]), dtype=torch.uint8)
            k, v = accel.decode_payload(payload.to(dev), lay)
    except (RuntimeError, ValueError, IndexError) as e:  # a verified blob that does not parse
        raise CorruptPage(f"blob does not decode: {e}", field="blob") from e
    return Decoded(Page(k=k, v=v, start_position=h.start_position), h.codec, h.precision)


def _decode_int4a(blob: Blob, lay: Layout, dev: torch.device) -> tuple[torch.Tensor,
                                                                          torch.Tensor]:
    """K and V of a verified int4a blob: on the CPU in one kernel, which checks the indices it
    uses itself; elsewhere through the int8 payload it expands to."""
    if _kernels_run_on(dev):  # one kernel, no int8 blob in between
        return cpu.decode_int4a(memoryview(blob), lay, int4a.page_plan(lay))
    check_indices(blob, lay)
    payload = torch.frombuffer(bytearray(memoryview(blob)[HEADER_SIZE:]), dtype=torch.uint8)
    if accel.available(dev):
        accel.check_payload(blob, lay)
        return accel.decode_payload(payload.to(dev), lay)
    payload8, lay8 = int4a.to_int8(payload.to(dev), lay)
    return torch_reference.decode_payload(payload8, lay8)


def _decode_int3(blob: Blob, lay: Layout, dev: torch.device) -> tuple[torch.Tensor,
                                                                        torch.Tensor]:
    """K and V of a verified int3 blob, through the int8 payload it expands to."""
    check_indices(blob, lay)
    if _kernels_run_on(dev):
        buf8, lay8 = int3.to_int8_blob(blob, lay)
        return cpu.decode(memoryview(buf8), lay8)
    payload = torch.frombuffer(bytearray(memoryview(blob)[HEADER_SIZE:]), dtype=torch.uint8)
    payload8, lay8 = int3.to_int8(payload.to(dev), lay, kernels=False)
    if accel.available(dev):
        return accel.decode_payload(payload8, lay8)
    return torch_reference.decode_payload(payload8, lay8)


def transcode(blob: Blob, target: Codec, params: CodecConfig) -> bytes:
    """Re-encode a blob to an equal or lossier codec.

    int8 -> int4 rewrites the integer codes only (``q4 = round(q8 / 17)`` on the same grid;
    the blob's groups, sinks and outliers are kept, ``params`` is not consulted); int8 ->
    int4a likewise (``q_b = round(q8 (2^b - 1) / 255)``, the same bytes as encoding the page
    with int4a; ``params.key_bits`` sets its key bit budget).
    int8 or int4a -> int3 likewise (:mod:`kvtier.codecs.int3`: the int4a codes with one bit
    less a key channel and ``params.int3_value_bits`` a value; from int8 through int4a with
    ``params.key_bits``), the same bytes as encoding the page with int3. From ``none``, and
    from int4 to int3 (int4's key codes are not int4a's), the page is decoded and encoded
    with ``params``. The same codec returns the
    blob unchanged. Asking for more precision than the blob holds, or for another codec of
    the same precision (int4 <-> int4a), raises InvalidArgument.
    """
    target = _check_codec(target, "target")
    h = verify(blob)
    if target.bits > h.codec.bits:
        raise InvalidArgument(f"cannot transcode {h.codec.value} to {target.value}: "
                              f"precision only goes down", field="target")
    if target is h.codec:
        return bytes(blob)
    if target.bits == h.codec.bits:
        raise InvalidArgument(f"cannot transcode {h.codec.value} to {target.value}: both hold "
                              f"{target.bits} bits, keep the blob as it is", field="target")
    if h.codec is Codec.NONE:
        page = decode(blob).page
        return encode(page, target, params, precision=h.precision)
    src = _layout_checked(h)
    if target is Codec.INT3:
        if h.codec is Codec.INT4:  # its codes are not int4a's: through the page
            return encode(decode(blob).page, target, params, precision=h.precision)
        if h.codec is Codec.INT8:
            blob, src = int4a.from_int8_blob(blob, src, params.key_bits)
        return _int3_seal(int3.from_int4a_blob(blob, src, params.int3_value_bits), h)
    if target is Codec.INT4A:
        return _int4a_seal(int4a.from_int8_blob(blob, src, params.key_bits), h)
    dst = make_layout(Codec.INT4, h.dtype, h.shape, h.sink_tokens, h.outliers, h.group_size)
    header = BlobHeader(
        codec=Codec.INT4, dtype=h.dtype, shape=h.shape, start_position=h.start_position,
        precision=min(h.precision, Precision.INT4), nbytes=HEADER_SIZE + dst.payload_nbytes,
        group_size=h.group_size, sink_tokens=h.sink_tokens, outliers=h.outliers,
        payload_nbytes=dst.payload_nbytes, checksum=0,
    )
    buf = bytearray(HEADER_SIZE + dst.payload_nbytes)
    buf[:HEADER_SIZE] = blobfmt.pack_header(header)
    mv = memoryview(blob)
    for name, (off, n) in src.offsets.items():
        if name not in ("kq", "vq"):
            doff, dn = dst.section(name)
            buf[doff:doff + dn] = mv[off:off + n]
    for name, width in (("kq", src.Ck), ("vq", src.HD)):
        off, n = src.section(name)
        doff, dn = dst.section(name)
        cpu.int8_rows_to_int4(mv[off:off + n], width, memoryview(buf)[doff:doff + dn])
    return blobfmt.seal(buf)


def warmup() -> float:
    """Compile every CPU kernel now (or load it from numba's cache) and self-test it; returns the
    seconds it took (0.0 when this process already did).

    The daemon calls this at start so that JIT compilation never lands in a request. The
    self-test encodes and decodes small pages with the kernels and with the torch oracle and
    raises RuntimeError if they disagree by a single byte (a stale on-disk cache that
    :mod:`kvtier.codecs.cpu` did not catch, a miscompiled kernel). Compiled kernels live as
    long as the process, so the work is done once per process (a memo, like numba's own
    dispatch cache).
    """
    if _self_test.cache_info().currsize:
        return 0.0
    if not kernels_cached():
        log.info("compiling the codec kernels for this machine (once; about 20 s on 2 cores)")
    t0 = time.perf_counter()
    _self_test()
    took = time.perf_counter() - t0
    log.info("codec kernels ready and self-tested in %.2f s", took)
    return took


@functools.cache
def _self_test() -> bool:
    g = torch.Generator().manual_seed(0)
    params = CodecConfig()
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        page = Page(k=(3 * torch.randn(2, 9, 2, 16, generator=g)).to(dtype),
                    v=torch.randn(2, 9, 2, 16, generator=g).to(dtype), start_position=1)
        for codec in (Codec.INT8, Codec.INT4):
            blob = encode(page, codec, params)
            lay = layout_for_encode(codec, str(dtype).removeprefix("torch."), page.shape,
                                    page.start_position, params)
            payload = torch_reference.encode_payload(page, lay)
            got = decode(blob).page
            want = torch_reference.decode_payload(payload, lay)
            if (blob[HEADER_SIZE:] != payload.numpy().tobytes() or not torch.equal(got.k, want[0])
                    or not torch.equal(got.v, want[1])):
                raise RuntimeError(
                    "codec kernels disagree with the torch oracle (a stale numba cache? delete "
                    "kvtier/codecs/cpu/__pycache__/*.nbi and *.nbc)")
        decode(bytearray(blob))
        decode(transcode(encode(page, Codec.INT8, params), Codec.INT4, params))
        blob = encode(page, Codec.INT4A, params)  # the one-kernel decode against the int8 one
        got = decode(blob).page
        buf8, lay8 = int4a.to_int8_blob(blob, _layout_checked(verify(blob)))
        want = cpu.decode(memoryview(buf8), lay8)
        if not (torch.equal(got.k, want[0]) and torch.equal(got.v, want[1])):
            raise RuntimeError("the int4a decode kernel disagrees with the int8 decode of the "
                               "same page (a stale numba cache?)")
    int4a.self_test()
    int3.self_test()
    return True


@functools.cache
def device_self_test(device: torch.device) -> bool:
    """Encode and decode small float16 and bfloat16 pages with every codec through the
    device kernels on ``device`` and check the bytes and tensors against the CPU kernels;
    turns the kernels off on a mismatch (:func:`kvtier.codecs.device.turn_off`). Compiles the
    kernels it runs (seconds, once per machine: Triton caches them). True when the kernels
    serve ``device``. Memoized: once per process and device."""
    if not accel.available(device):
        return False
    params = CodecConfig()
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16):
        k = torch.randn(2, 40, 2, 32, generator=g)
        k[..., 5] *= 30
        page = Page(k=k.to(dtype), v=torch.randn(2, 40, 2, 32, generator=g).to(dtype),
                    start_position=1)
        on_dev = Page(k=page.k.to(device), v=page.v.to(device), start_position=1)
        for codec in (Codec.INT8, Codec.INT4, Codec.INT4A):
            want = encode(page, codec, params)
            back = decode(want, device).page
            host = decode(want).page
            if encode(on_dev, codec, params) != want or not (
                    torch.equal(back.k.cpu(), host.k) and torch.equal(back.v.cpu(), host.v)):
                accel.turn_off(f"{codec.value} {dtype} disagrees with the CPU kernels")
                return False
    return accel.available(device)

