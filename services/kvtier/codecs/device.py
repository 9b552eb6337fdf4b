"""Codec work on an accelerator: the Triton kernels where they run, else the torch reference.

What :mod:`kvtier.codecs.codec` calls for pages and payloads that are not on the CPU, and what
the store's device transfers call to keep the bytes on the device until they are compressed:

    encode_payload(page, lay)        -> device payload of an int8/int4/none page
    int4a_payload(page, lay8, bits)  -> device payload and layout of an int4a page
    encode_on_device(page, codec, params) -> DeviceBlob: header fields + device payload
    seal(dblob, host_payload)        -> the blob, once its payload is on the host
    check_payload(blob, lay)         -> CorruptPage unless the kernels may index with it
    decode_payload(payload, lay, k, v) -> K and V on the payload's device

Both paths give the bytes of the CPU kernels (the tests hold them to it). The kernels
(:mod:`kvtier.codecs.cuda`) are used for CUDA tensors when Triton imports; otherwise, and
for any other device, the pure-torch reference runs there
(:mod:`kvtier.codecs.torch_reference`, :mod:`kvtier.codecs.int4a`). Work is queued on the
current CUDA stream; nothing here synchronizes except where it hands bytes to the host.

The kernels are turned off for the rest of the process, with an error logged, when one of
them raises (a Triton that cannot compile or launch here) or when the self-test
(:func:`kvtier.codecs.codec.device_self_test`) finds them disagreeing with the CPU kernels by
one byte: the torch reference is slower but right.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from types import ModuleType

import torch

from kvtier.codecs import int4a, torch_reference
from kvtier.codecs import blob as blobfmt
from kvtier.codecs.blob import HEADER_SIZE
from kvtier.codecs.layout import Layout, check_indices, layout_for_encode, make_layout
from kvtier.config import CodecConfig
from kvtier.errors import CorruptPage
from kvtier.pages import dtype_name
from kvtier.types import Codec, Page, Precision

log = logging.getLogger(__name__)

Blob = bytes | bytearray | memoryview


@functools.cache
def _launch() -> ModuleType | None:
    """The kernels' launcher, or None when Triton does not import here (logged once)."""
    try:
        from kvtier.codecs.cuda import launch
    except Exception as e:  # ImportError, or a Triton that fails to initialise
        log.warning("device codec kernels unavailable (%s); CUDA pages use the torch codec", e)
        return None
    return launch


_off: list[str] = []  # why the kernels were turned off, if they were


def available(device: torch.device) -> bool:
    """Whether pages on ``device`` go through the Triton kernels (a CUDA device, Triton
    importable, the kernels not turned off); the torch reference serves them otherwise."""
    return (device.type == "cuda" and not _off and torch.cuda.is_available()
            and _launch() is not None)


def turn_off(why: str, exc: BaseException | None = None) -> None:
    """Turn the kernels off for the rest of the process (logged once): the torch reference
    serves CUDA pages from now on."""
    if not _off:
        log.error("device codec kernels turned off (%s); CUDA pages use the torch codec", why,
                  exc_info=exc)
    _off.append(why)


def encode_payload(page: Page, lay: Layout) -> torch.Tensor:
    """The payload (uint8, on the page's device) of an int8, int4 or ``none`` page."""
    k, v = page.k, page.v
    launch = _launch() if lay.codec is not Codec.NONE and available(k.device) else None
    if launch is not None and launch.supports(lay):  # else (int4, odd V groups) the reference
        try:
            out: torch.Tensor = launch.encode(k.contiguous(), v.contiguous(), lay)
            return out
        except Exception as e:  # a Triton that cannot compile or launch here
            turn_off("encode raised", e)
    return torch_reference.encode_payload(page, lay)


def int4a_payload(page: Page, lay8: Layout, key_bits: float) -> tuple[torch.Tensor, Layout]:
    """The int4a payload and layout of ``page`` (on its device): the bytes of its int8
    payload under ``lay8`` turned into int4a as on the host
    (:func:`kvtier.codecs.int4a.from_int8`); the kernels write them without the int8 payload
    (:func:`kvtier.codecs.cuda.launch.encode_int4a`) where V's groups are of an even length."""
    launch = _launch() if available(page.k.device) else None
    lay = int4a.int4a_layout(lay8, key_bits)
    if launch is not None and launch.supports(lay):
        try:
            out: torch.Tensor = launch.encode_int4a(page.k.contiguous(), page.v.contiguous(),
                                                    lay8, lay)
            return out, lay
        except Exception as e:
            turn_off("int4a encode raised", e)
    payload8 = encode_payload(page, lay8)
    return int4a_from_int8(payload8, lay8, key_bits)


def int4a_from_int8(payload8: torch.Tensor, lay8: Layout,
                    key_bits: float) -> tuple[torch.Tensor, Layout]:
    """int8 payload (on a device) -> int4a payload and layout, on the same device."""
    launch = _launch() if available(payload8.device) else None
    if launch is not None:
        lay = int4a.int4a_layout(lay8, key_bits)
        try:
            out: torch.Tensor = launch.int4a_from_int8(payload8, lay8, lay)
            return out, lay
        except Exception as e:
            turn_off("int4a transcode raised", e)
    return int4a.from_int8(payload8, lay8, key_bits, kernels=False)


def int4_from_int8(payload8: torch.Tensor, lay8: Layout) -> tuple[torch.Tensor, Layout]:
    """int8 payload (on a device) -> int4 payload and layout on the same grid."""
    lay4 = make_layout(Codec.INT4, lay8.dtype, (lay8.L, lay8.T, lay8.H, lay8.D), lay8.S,
                       lay8.n_out, lay8.group_size)
    launch = _launch() if available(payload8.device) else None
    if launch is not None:
        try:
            out: torch.Tensor = launch.int4_from_int8(payload8, lay8, lay4)
            return out, lay4
        except Exception as e:
            turn_off("int4 transcode raised", e)
    from kvtier.codecs.pack import pack_int4

    out = torch.zeros(lay4.payload_nbytes, dtype=torch.uint8, device=payload8.device)
    for name, off, n in lay4.sections:
        src_off = lay8.section(name)[0] - HEADER_SIZE
        if not n:
            continue  # an empty section (no kept K channel, or no quantized token)
        if name in ("kq", "vq"):
            width = lay8.Ck if name == "kq" else lay8.HD
            q8 = payload8[src_off:src_off + lay8.section(name)[1]].reshape(-1, width)
            out[off - HEADER_SIZE:off - HEADER_SIZE + n] = \
                pack_int4(torch_reference.int8_to_int4(q8)).reshape(-1)
        else:
            out[off - HEADER_SIZE:off - HEADER_SIZE + n] = payload8[src_off:src_off + n]
    return out, lay4


@dataclass(frozen=True, slots=True)
class DeviceBlob:
    """A blob whose payload is still on the device: the header bytes (checksum not yet
    computed), the payload tensor and its layout."""

    header: bytes
    payload: torch.Tensor
    layout: Layout

    @property
    def payload_nbytes(self) -> int:
        return self.layout.payload_nbytes


def encode_on_device(page: Page, codec: Codec, params: CodecConfig, *,
                     precision: Precision | None = None) -> DeviceBlob:
    """Encode a device page without leaving the device: what :func:`seal` turns into the
    blob :func:`kvtier.codecs.encode` gives, once the payload is copied to the host.

    The page must pass :func:`kvtier.codecs.encode`'s checks (the store only holds such
    pages); this does not repeat them.
    """
    k = page.k
    dtype = dtype_name(k.dtype)
    shape = page.shape
    prec = Precision.of_codec(codec)
    if precision is not None:
        prec = min(prec, Precision(precision))
    if codec is Codec.INT4A:
        lay8 = layout_for_encode(Codec.INT8, dtype, shape, page.start_position, params)
        payload, lay = int4a_payload(page, lay8, params.key_bits)
        prec = min(prec, Precision.INT4)
    else:
        lay = layout_for_encode(codec, dtype, shape, page.start_position, params)
        payload = encode_payload(page, lay)
    head = bytearray(HEADER_SIZE)
    blobfmt.pack_header_into(head, codec, dtype, shape, page.start_position, prec,
                             params.group_size, lay.S, lay.n_out, lay.payload_nbytes,
                             key_bits=lay.key_bits)
    return DeviceBlob(bytes(head), payload, lay)


def seal(dblob: DeviceBlob, host_payload: Blob) -> bytes:
    """The sealed blob of ``dblob`` given its payload's bytes on the host."""
    buf = bytearray(dblob.header)
    buf += host_payload
    return blobfmt.seal(buf)


def check_payload(blob: Blob, lay: Layout) -> None:
    """CorruptPage unless the values the kernels index with are in range (outlier indices,
    scale exponents, int4a's key bit map): a checksum stops accidents, not a forged blob."""
    check_indices(blob, lay)
    if lay.codec is Codec.INT4A and lay.Tq:
        int4a.read_bits(torch.frombuffer(bytearray(memoryview(blob)[HEADER_SIZE:]),
                                         dtype=torch.uint8), lay)


def decode_payload(payload: torch.Tensor, lay: Layout, k_out: torch.Tensor | None = None,
                   v_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of a checked payload (see :func:`check_payload`) on its device, written into
    ``k_out``/``v_out`` when given (contiguous, page dtype and shape, same device)."""
    launch = _launch() if available(payload.device) else None
    if launch is not None:
        try:
            k, v = launch.decode(payload, lay, k_out, v_out)
            return k, v
        except Exception as e:
            turn_off("decode raised", e)
    if lay.codec is Codec.INT4A:
        payload, lay = int4a.to_int8(payload, lay, kernels=False)
    try:
        k, v = torch_reference.decode_payload(payload, lay)
    except (RuntimeError, ValueError, IndexError) as e:
        raise CorruptPage(f"blob does not decode: {e}", field="blob") from e
    if k_out is not None and v_out is not None:
        k_out.copy_(k)
        v_out.copy_(v)
        return k_out, v_out
    return k, v
