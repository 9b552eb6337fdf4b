"""Round trips: error bounds per dtype and bit width, protected data bit-exact, headers."""

from __future__ import annotations

import threading

import pytest
import torch
from codec_helpers import DTYPES, error_bound, make_kv, ulp

from kvtier.codecs import decode, encode, read_header
from kvtier.config import CodecConfig
from kvtier.errors import InvalidArgument
from kvtier.types import Codec, Page, Precision

P = CodecConfig()


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_none_is_bit_exact_and_keeps_dtype_and_position(dtype: str) -> None:
    page = make_kv((2, 16, 2, 32), DTYPES[dtype], start=123)
    d = decode(encode(page, Codec.NONE, P))
    assert d.codec is Codec.NONE and d.precision is Precision.FULL
    assert d.page.k.dtype == DTYPES[dtype] and d.page.start_position == 123
    assert torch.equal(d.page.k, page.k) and torch.equal(d.page.v, page.v)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("codec", [Codec.INT8, Codec.INT4])
@pytest.mark.parametrize("shape,start", [
    ((2, 70, 2, 128), 0),     # sinks, a short last K group, 1 outlier per head
    ((1, 64, 3, 24), 9),      # H*D = 72: a short last V group; odd C' = 3*23
    ((3, 5, 1, 8), 64),       # tokens < group: K groups clipped to 5 tokens
])
def test_error_within_pinned_bound(dtype: str, codec: Codec, shape: tuple[int, int, int, int],
                                   start: int) -> None:
    page = make_kv(shape, DTYPES[dtype], start=start, seed=3)
    blob = encode(page, codec, P)
    h = read_header(blob)
    d = decode(blob)
    assert d.page.k.dtype == DTYPES[dtype] and d.page.shape == shape
    assert d.page.start_position == start and d.precision is Precision.of_codec(codec)
    bk, bv = error_bound(page, h.sink_tokens, codec.bits)
    for orig, got, bound in ((page.k, d.page.k, bk), (page.v, d.page.v, bv)):
        err = (orig.double() - got.double()).abs()
        limit = bound * (1 + 1e-5) + ulp(got)
        assert bool((err <= limit).all()), float((err - limit).max())
        # and the bound is not vacuous: typical errors are a fraction of the step
        q = bound > 0
        assert float(err[q].mean()) < 0.7 * float(bound[q].mean())


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_int4_error_is_about_17_times_int8(dtype: str) -> None:
    page = make_kv((2, 64, 2, 64), DTYPES[dtype], seed=5)
    e8 = (decode(encode(page, Codec.INT8, P)).page.v.double() - page.v.double()).abs().mean()
    e4 = (decode(encode(page, Codec.INT4, P)).page.v.double() - page.v.double()).abs().mean()
    assert 8 < float(e4 / e8) < 25


@pytest.mark.parametrize("start,expect", [(0, 4), (2, 2), (3, 1), (4, 0), (100, 0)])
def test_sink_tokens_kept_bit_exact(start: int, expect: int) -> None:
    page = make_kv((2, 32, 2, 64), start=start, seed=7)
    page.k[:, 0] *= 40  # sinks are huge in real caches; they must not blow up the grid
    blob = encode(page, Codec.INT4, P)
    assert read_header(blob).sink_tokens == expect
    got = decode(blob).page
    assert torch.equal(got.k[:, :expect], page.k[:, :expect])
    assert torch.equal(got.v[:, :expect], page.v[:, :expect])
    if expect < 4:  # the next token is quantized
        assert not torch.equal(got.v[:, expect], page.v[:, expect])


def test_page_of_only_sinks_is_exact() -> None:
    page = make_kv((2, 3, 2, 16), start=0)
    blob = encode(page, Codec.INT8, P)
    h = read_header(blob)
    assert h.sink_tokens == 3 and h.outliers == 0
    got = decode(blob).page
    assert torch.equal(got.k, page.k) and torch.equal(got.v, page.v)


@pytest.mark.parametrize("head_dim,expect", [(64, 1), (128, 1), (256, 2)])
def test_outlier_channels_kept_bit_exact(head_dim: int, expect: int) -> None:
    page = make_kv((2, 40, 3, head_dim), start=50, seed=11)
    planted = [(0, 0, 5), (0, 1, head_dim - 1), (1, 2, 17)]
    for layer, head, ch in planted:
        page.k[layer, :, head, ch] = page.k[layer, :, head, ch] * 3 + 60
    blob = encode(page, Codec.INT4, P)
    assert read_header(blob).outliers == expect
    got = decode(blob).page.k
    for layer, head, ch in planted:
        assert torch.equal(got[layer, :, head, ch], page.k[layer, :, head, ch])
    # a quantized channel next to a planted one is not exact (it is int4)
    assert not torch.equal(got[0, :, 0, 6], page.k[0, :, 0, 6])


def test_outlier_config_is_honoured() -> None:
    page = make_kv((1, 16, 1, 128), start=50)
    params = CodecConfig(outlier_fraction=0.05, min_outlier_channels=1)
    assert read_header(encode(page, Codec.INT8, params)).outliers == 6
    params = CodecConfig(outlier_fraction=0.0, min_outlier_channels=0, sink_tokens=0)
    h = read_header(encode(make_kv((1, 16, 1, 128), start=0), Codec.INT8, params))
    assert h.outliers == 0 and h.sink_tokens == 0


def test_compression_ratio_with_all_metadata() -> None:
    page = make_kv((1, 64, 2, 128), start=64)  # a 64 KiB fp16 page
    assert page.nbytes == 64 * 1024
    assert page.nbytes / len(encode(page, Codec.INT8, P)) >= 1.9
    assert page.nbytes / len(encode(page, Codec.INT4, P)) >= 3.5


def test_constant_and_zero_groups() -> None:
    k = torch.zeros(1, 16, 1, 64, dtype=torch.float16)
    v = torch.full((1, 16, 1, 64), 3.25, dtype=torch.float16)
    page = Page(k=k, v=v, start_position=10)
    for codec in (Codec.INT8, Codec.INT4):
        got = decode(encode(page, codec, P)).page
        assert torch.equal(got.k, k)
        assert float((got.v.float() - 3.25).abs().max()) <= 3.25 / 2047 * 17


def test_precision_passed_through_is_recorded() -> None:
    page = make_kv((1, 8, 1, 16))
    assert decode(encode(page, Codec.NONE, P, precision=Precision.INT4)).precision is \
        Precision.INT4
    assert read_header(encode(page, Codec.INT8, P, precision=Precision.FULL)).precision is \
        Precision.INT8


def test_bad_arguments_name_the_field() -> None:
    page = make_kv((1, 8, 1, 16))
    with pytest.raises(InvalidArgument) as e:
        encode(page, "int8", P)  # type: ignore[arg-type]
    assert e.value.field == "codec"
    with pytest.raises(InvalidArgument) as e:
        encode("page", Codec.INT8, P)  # type: ignore[arg-type]
    assert e.value.field == "page"
    with pytest.raises(InvalidArgument) as e:
        encode(Page(k=page.k, v=page.v, start_position=-1), Codec.INT8, P)
    assert e.value.field == "start_position"
    empty = torch.zeros(1, 0, 1, 16, dtype=torch.float16)
    with pytest.raises(InvalidArgument) as e:
        encode(Page(k=empty, v=empty, start_position=0), Codec.NONE, P)
    assert e.value.field == "page.shape"
    bad = Page(k=page.k.to(torch.float64), v=page.v.to(torch.float64), start_position=0)
    with pytest.raises(InvalidArgument) as e:
        encode(bad, Codec.INT8, P)
    assert e.value.field == "dtype"


def test_thread_safe_results_identical() -> None:
    pages = [make_kv((2, 48, 2, 64), seed=s) for s in range(4)]
    want = [encode(p, Codec.INT4, P) for p in pages]
    errors: list[str] = []

    def work(i: int) -> None:
        for _ in range(5):
            b = encode(pages[i % 4], Codec.INT4, P)
            if b != want[i % 4]:
                errors.append("encode differs")
            if not torch.equal(decode(b).page.k, decode(want[i % 4]).page.k):
                errors.append("decode differs")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("codec", list(Codec))
def test_cuda_path_matches_cpu_bytes(codec: Codec) -> None:
    page = make_kv((2, 70, 2, 128), start=0)
    cuda = Page(k=page.k.cuda(), v=page.v.cuda(), start_position=0)
    blob = encode(cuda, codec, P)
    assert blob == encode(page, codec, P)
    got = decode(blob, device=torch.device("cuda"))
    assert got.page.k.is_cuda
    cpu = decode(blob).page
    assert torch.equal(got.page.k.cpu(), cpu.k) and torch.equal(got.page.v.cpu(), cpu.v)
