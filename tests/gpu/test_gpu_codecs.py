"""Device codecs on a CUDA device: the Triton kernels give the CPU kernels' blobs byte for
byte (every codec, dtype and several shapes), decode to the same tensors, transcode on the
device as on the host; the torch reference still serves when the kernels are off."""

from __future__ import annotations

import pytest
import torch
from codec_helpers import DTYPES, make_kv

from kvtier.codecs import decode, encode, read_header, transcode
from kvtier.codecs import device as accel
from kvtier.codecs.codec import device_self_test
from kvtier.codecs.blob import HEADER_SIZE
from kvtier.codecs.layout import layout_for_encode, layout_of
from kvtier.config import CodecConfig
from kvtier.errors import CorruptPage
from kvtier.types import Codec, Page

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

P = CodecConfig()
CUDA = torch.device("cuda")
SHAPES = [
    ((2, 70, 2, 128), 0),    # sinks, a short last K group, one outlier a head
    ((1, 64, 3, 24), 9),     # H*D = 72: a short last V group; odd C'
    ((3, 5, 1, 24), 64),     # tokens < group: K groups clipped to 5 tokens
    ((2, 20, 2, 15), 1),     # odd head_dim: no rotary pairs, odd row widths
    ((1, 3, 2, 24), 0),      # every token a sink
    ((4, 257, 8, 128), 2),   # many groups, an odd token count, 8 heads
]
ODD_PARAMS = CodecConfig(group_size=32, sink_tokens=8, outlier_fraction=0.05, key_bits=3.5)


def _wide(page: Page) -> Page:
    """K with channels 40x and 12x wider than the rest, as real keys' outliers are."""
    k = page.k.float().clone()
    k[..., 5] *= 40
    k[..., 6] *= 12
    return Page(k=k.to(page.k.dtype), v=page.v, start_position=page.start_position)


def _cuda(page: Page) -> Page:
    return Page(k=page.k.to(CUDA), v=page.v.to(CUDA), start_position=page.start_position)


def _payload(blob: bytes, device: torch.device = CUDA) -> torch.Tensor:
    return torch.frombuffer(bytearray(blob[HEADER_SIZE:]), dtype=torch.uint8).to(device)


def test_the_kernels_serve_cuda_pages() -> None:
    assert accel.available(CUDA), "Triton did not import: CUDA pages fall back to torch"


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape,start", SHAPES)
def test_device_blobs_are_the_cpu_blobs(dtype: str, shape: tuple[int, int, int, int],
                                        start: int) -> None:
    page = _wide(make_kv(shape, DTYPES[dtype], start=start, seed=7))
    gpu = _cuda(page)
    for params in (P, ODD_PARAMS):
        for codec in (Codec.INT8, Codec.INT4, Codec.INT4A, Codec.NONE):
            want = encode(page, codec, params)
            got = encode(gpu, codec, params)
            assert got == want, (codec, params)
            back = decode(want, device=CUDA).page
            cpu = decode(want).page
            assert back.k.is_cuda
            assert torch.equal(back.k.cpu(), cpu.k) and torch.equal(back.v.cpu(), cpu.v), codec


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_transcode_on_the_device_is_the_direct_encode(dtype: str) -> None:
    page = _wide(make_kv((2, 70, 2, 128), DTYPES[dtype], start=0, seed=8))
    b8 = encode(page, Codec.INT8, P)
    lay8 = layout_of(read_header(b8))
    p4, lay4 = accel.int4_from_int8(_payload(b8), lay8)
    assert p4.cpu().numpy().tobytes() == transcode(b8, Codec.INT4, P)[HEADER_SIZE:]
    assert p4.cpu().numpy().tobytes() == encode(page, Codec.INT4, P)[HEADER_SIZE:]
    pa, laya = accel.int4a_from_int8(_payload(b8), lay8, P.key_bits)
    assert pa.cpu().numpy().tobytes() == encode(page, Codec.INT4A, P)[HEADER_SIZE:]
    assert laya == layout_of(read_header(encode(page, Codec.INT4A, P)))


def test_a_batch_is_its_pages() -> None:
    from kvtier.codecs.cuda import launch

    shape = (8, 64, 8, 128)
    pages = [make_kv(shape, torch.float16, start=64, seed=s) for s in range(6)]
    k = torch.stack([p.k for p in pages]).to(CUDA)
    v = torch.stack([p.v for p in pages]).to(CUDA)
    for codec in (Codec.INT8, Codec.INT4):
        lay = layout_for_encode(codec, "float16", shape, 64, P)
        out = launch.encode(k, v, lay)
        for i, p in enumerate(pages):
            assert out[i].cpu().numpy().tobytes() == encode(p, codec, P)[HEADER_SIZE:]
        kk, vv = launch.decode(out, lay)
        for i, p in enumerate(pages):
            want = decode(encode(p, codec, P)).page
            assert torch.equal(kk[i].cpu(), want.k) and torch.equal(vv[i].cpu(), want.v)


def test_the_torch_reference_still_serves_cuda_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel, "available", lambda device: False)
    page = make_kv((2, 40, 2, 64), torch.bfloat16, start=0, seed=9)
    for codec in (Codec.INT8, Codec.INT4, Codec.INT4A):
        want = encode(page, codec, P)
        assert encode(_cuda(page), codec, P) == want
        got = decode(want, device=CUDA).page
        cpu = decode(want).page
        assert torch.equal(got.k.cpu(), cpu.k) and torch.equal(got.v.cpu(), cpu.v)


def test_a_forged_bit_map_never_reaches_the_kernels() -> None:
    blob = bytearray(encode(make_kv((1, 40, 2, 16), start=0), Codec.INT4A, P))
    lay = layout_of(read_header(blob))
    off, _ = lay.section("kbits")
    blob[off] = 0xFF
    from kvtier.codecs import blob as blobfmt

    sealed = blobfmt.seal(blob)  # a valid checksum over a forged map
    with pytest.raises(CorruptPage):
        decode(sealed, device=CUDA)


def test_device_blob_and_seal() -> None:
    page = _cuda(make_kv((2, 64, 2, 64), torch.float16, start=0, seed=10))
    for codec in (Codec.INT8, Codec.INT4A):
        d = accel.encode_on_device(page, codec, P)
        assert d.payload.is_cuda
        blob = accel.seal(d, d.payload.cpu().numpy().tobytes())
        assert blob == encode(page, codec, P)


def test_the_kernels_self_test_and_never_turned_off() -> None:
    """Runs last in this module: no kernel raised or disagreed with the CPU kernels above
    (either turns the kernels off and the torch reference serves, slower)."""
    assert device_self_test(CUDA)
    assert accel._off == []  # noqa: SLF001
