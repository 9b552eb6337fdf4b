"""int3: the deep tier's codec, a function of the int4a blob (so of the int8 blob) of a page."""

from __future__ import annotations

import pytest
import torch
from codec_helpers import make_kv

from kvtier.codecs import blob as blobfmt
from kvtier.codecs import decode, encode, int3, int4a, read_header, transcode
from kvtier.codecs.blob import HEADER_SIZE
from kvtier.codecs.layout import layout_of
from kvtier.config import CodecConfig, RedisConfig, Settings, TierConfig
from kvtier.errors import CorruptPage, InvalidArgument
from kvtier.store.store import TierStore
from kvtier.types import Codec, Medium, Page, Precision

P = CodecConfig()
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _page(shape: tuple[int, int, int, int], dtype: torch.dtype = torch.float16, seed: int = 0,
          start: int = 0) -> Page:
    """Keys with unequal channels (one 40x, one 12x wider), values with unequal tokens."""
    page = make_kv(shape, torch.float32, start=start, seed=seed)
    k, v = page.k.clone(), page.v.clone()
    k[..., min(5, shape[3] - 1)] *= 40
    k[..., min(6, shape[3] - 1)] *= 12
    g = torch.Generator().manual_seed(seed)
    v = v * (0.2 + 3 * torch.rand(shape[1], 1, 1, generator=g))
    return Page(k=k.to(dtype), v=v.to(dtype), start_position=start)


def _payload(blob: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(blob[HEADER_SIZE:]), dtype=torch.uint8)


SHAPES = [((2, 96, 2, 64), 0), ((3, 70, 3, 24), 2), ((2, 33, 3, 10), 7), ((2, 5, 1, 7), 0),
          ((1, 130, 4, 128), 1), ((2, 3, 2, 16), 0)]  # the last: every token a sink


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_way_down_gives_the_direct_encode_bytes(dtype: torch.dtype) -> None:
    for shape, start in SHAPES:
        page = _page(shape, dtype, start=start)
        direct = encode(page, Codec.INT3, P)
        b8 = encode(page, Codec.INT8, P)
        assert transcode(b8, Codec.INT3, P) == direct
        assert transcode(transcode(b8, Codec.INT4A, P), Codec.INT3, P) == direct
        assert transcode(encode(page, Codec.INT4A, P), Codec.INT3, P) == direct
        assert transcode(encode(page, Codec.NONE, P), Codec.INT3, P) == direct
        assert transcode(direct, Codec.INT3, P) == direct
        h = read_header(direct)
        assert h.codec is Codec.INT3 and h.precision is Precision.INT3 and h.dtype == \
            str(dtype).removeprefix("torch.")
        dec = decode(direct)
        assert dec.codec is Codec.INT3 and dec.precision is Precision.INT3
        assert dec.page.k.dtype == dtype and dec.page.k.shape == shape


def test_kernels_give_the_torch_bytes_both_ways() -> None:
    for (shape, start), vb in zip(SHAPES, (3.0, 3.3, 1.0, 4.0, 2.5, 3.0), strict=True):
        params = CodecConfig(int3_value_bits=vb)
        b4 = encode(_page(shape, start=start, seed=2), Codec.INT4A, params)
        lay4a = layout_of(read_header(b4))
        fast, lay = int3.from_int4a(_payload(b4), lay4a, vb)
        slow, _ = int3.from_int4a(_payload(b4), lay4a, vb, kernels=False)
        assert torch.equal(fast, slow)
        assert torch.equal(int3.to_int8(fast, lay)[0], int3.to_int8(fast, lay, kernels=False)[0])
    assert int3.self_test()


def test_the_header_carries_the_bit_budget_and_the_maps_spend_it() -> None:
    page = _page((2, 128, 3, 64), seed=4, start=10)
    blob = encode(page, Codec.INT3, P)
    h = read_header(blob)
    b4a = encode(page, Codec.INT4A, P)
    kept = 64 - h.outliers
    assert h.key_bits == read_header(b4a).key_bits - kept == 3 * kept
    assert h.value_bits == 48
    lay = layout_of(h)
    kb, vb = int3.read_maps(_payload(blob), lay)
    assert bool((kb.to(torch.int64).sum(-1) == 3 * h.key_bits).all())
    assert bool((vb.to(torch.int64).sum(-1) == lay.v_budget).all()) and lay.v_budget == 3 * 128 * 3
    # each key channel is int4a's width less one
    lay4a = layout_of(read_header(b4a))
    assert torch.equal(kb, int4a.read_bits(_payload(b4a), lay4a) - 1)
    # more value bits: a bigger blob, a smaller value error, the same keys
    sizes, errs = [], []
    for v in (2.0, 3.0, 3.5, 4.0):
        params = CodecConfig(int3_value_bits=v)
        b = encode(page, Codec.INT3, params)
        assert read_header(b).value_bits == round(16 * v)
        sizes.append(len(b))
        errs.append(float((decode(b).page.v.double() - page.v.double()).square().mean()))
        assert torch.equal(decode(b).page.k, decode(blob).page.k)
    assert sizes == sorted(sizes) and errs == sorted(errs, reverse=True)
    # at 4 value bits the values are int4a's exactly
    four = decode(encode(page, Codec.INT3, CodecConfig(int3_value_bits=4.0))).page
    assert torch.equal(four.v, decode(b4a).page.v)


def test_a_page_of_smollm2s_shape_is_over_four_and_a_half_times_smaller() -> None:
    page = _page((30, 256, 3, 64), seed=1, start=256)  # a page past the sinks
    blob = encode(page, Codec.INT3, P)
    assert page.nbytes / len(blob) >= 4.5
    assert page.nbytes / len(encode(page, Codec.INT4A, P)) < 3.7
    err3 = (decode(blob).page.k.double() - page.k.double()).square().mean()
    err4 = (decode(encode(page, Codec.INT4A, P)).page.k.double() - page.k.double()).square().mean()
    assert err4 < err3 < 8 * err4


def _forged(blob: bytes, section: str, value: int, index: int = 0) -> bytes:
    """``blob`` with one byte of ``section`` set and the checksum made valid again: what a
    hostile writer to the shared tier could store."""
    lay = layout_of(read_header(blob))
    off, _ = lay.section(section)
    buf = bytearray(blob)
    buf[off + index] = value
    return blobfmt.seal(buf)


def test_corrupt_blobs_are_refused() -> None:
    page = _page((2, 96, 2, 64), seed=6)
    blob = encode(page, Codec.INT3, P)
    bad = bytearray(blob)
    bad[-1] ^= 1
    with pytest.raises(CorruptPage):
        decode(bytes(bad))
    lay = layout_of(read_header(blob))
    kb0 = blob[lay.section("kbits")[0]]
    vb0 = blob[lay.section("vbits")[0]]
    for section, value, field in (
            ("kbits", kb0 & 0xF0, "blob.kbits"),  # a width 0
            ("kbits", (kb0 & 0xF0) | min(8, (kb0 & 0xF) + 1), "blob.kbits"),  # sum off by one
            ("vbits", vb0 ^ 0x01, "blob.vbits")):  # a value group one bit off
        forged = _forged(blob, section, value)
        with pytest.raises(CorruptPage) as e:
            decode(forged)
        assert e.value.field == field
        with pytest.raises(CorruptPage):
            int3.to_int8(_payload(forged), lay, kernels=False)
    # header budgets out of range, or on a codec that has none
    for offset, value, codec in ((44, 15, Codec.INT3), (44, 65, Codec.INT3), (42, 1, Codec.INT3),
                                 (44, 48, Codec.INT4A), (44, 48, Codec.INT8)):
        src = bytearray(blob if codec is Codec.INT3 else encode(page, codec, P))
        src[offset:offset + 2] = value.to_bytes(2, "little")
        with pytest.raises(CorruptPage):
            decode(blobfmt.seal(src))
    # a forged int4a map is refused on the way down too
    b4a = encode(page, Codec.INT4A, P)
    lay4a = layout_of(read_header(b4a))
    with pytest.raises(CorruptPage):
        transcode(_forged(b4a, "kbits", 0x11), Codec.INT3, P)
    with pytest.raises(CorruptPage):
        int3.from_int4a_blob(_forged(b4a, "kbits", 0x11), lay4a, 3.0)


def test_precision_only_goes_down() -> None:
    page = _page((2, 40, 2, 32))
    blob = encode(page, Codec.INT3, P)
    for target in (Codec.INT4A, Codec.INT4, Codec.INT8, Codec.NONE):
        with pytest.raises(InvalidArgument):
            transcode(blob, target, P)
    # int4's codes are not int4a's: it goes down through the page, and stays lossier than int4
    from_int4 = transcode(encode(page, Codec.INT4, P), Codec.INT3, P)
    assert read_header(from_int4).precision is Precision.INT3
    # a page that went through int4 and is re-encoded as none still says so; int3 then wins
    again = encode(decode(encode(page, Codec.INT4, P)).page, Codec.NONE, P,
                   precision=Precision.INT4)
    assert read_header(transcode(again, Codec.INT3, P)).precision is Precision.INT3


def test_redis_as_an_int3_tier_returns_the_direct_encode(redis_url: str) -> None:
    gib = 1 << 30
    tiers = [TierConfig(name="hot", medium=Medium.DEVICE, codec=Codec.NONE, capacity_bytes=gib),
             TierConfig(name="cold", medium=Medium.HOST, codec=Codec.INT4A, capacity_bytes=gib),
             TierConfig(name="remote", medium=Medium.REDIS, codec=Codec.INT3,
                        capacity_bytes=gib)]
    settings = Settings(redis=RedisConfig(url=redis_url, prefix="int3t"), device="cpu",
                        mover_interval_s=0.01, tiers=tiers)
    store = TierStore(settings)
    store.start(mover=False)
    try:
        page = make_kv((2, 40, 2, 32), start=0, seed=5)
        store.put("ns", [(b"r", page)])
        assert store.demote("ns", [b"r"], "cold") == [True]
        assert store.demote("ns", [b"r"], "remote") == [True]
        got = store.get("ns", [b"r"])[0]
        assert got is not None and got.tier == "remote" and got.precision is Precision.INT3
        ref = decode(encode(page, Codec.INT3, settings.codec)).page
        assert torch.equal(got.page.k, ref.k) and torch.equal(got.page.v, ref.v)
    finally:
        store.close()


def test_a_stack_with_int3_below_int4a_demotes_on_the_codes() -> None:
    gib = 1 << 30
    tiers = [TierConfig(name="hot", medium=Medium.DEVICE, codec=Codec.NONE, capacity_bytes=gib),
             TierConfig(name="warm", medium=Medium.HOST, codec=Codec.INT8, capacity_bytes=gib),
             TierConfig(name="cold", medium=Medium.HOST, codec=Codec.INT4A, capacity_bytes=gib),
             TierConfig(name="deep", medium=Medium.HOST, codec=Codec.INT3, capacity_bytes=gib)]
    settings = Settings(redis=RedisConfig(url=None), device="cpu", mover_interval_s=0.01,
                        tiers=tiers)
    store = TierStore(settings)
    try:
        page = make_kv((4, 64, 2, 64), start=0, seed=3)
        store.put("ns", [(b"k", page)])
        for tier in ("warm", "cold", "deep"):
            store.demote("ns", [b"k"], tier)
        got = store.get("ns", [b"k"])[0]
        assert got is not None and got.tier == "deep" and got.precision is Precision.INT3
        ref = decode(encode(page, Codec.INT3, settings.codec)).page
        assert torch.equal(got.page.k, ref.k) and torch.equal(got.page.v, ref.v)
        assert store.stats().tiers[3].codec == "int3"
    finally:
        store.close()
    with pytest.raises(ValueError):  # int3 above int4a gains precision going down
        Settings(tiers=[tiers[0], tiers[1], tiers[3], tiers[2]])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_device_path_gives_the_cpu_bytes_and_pages() -> None:
    for dtype in (torch.float16, torch.bfloat16):
        page = _page((2, 96, 2, 64), dtype, seed=7)
        on_dev = Page(k=page.k.cuda(), v=page.v.cuda(), start_position=0)
        blob = encode(page, Codec.INT3, P)
        assert encode(on_dev, Codec.INT3, P) == blob
        got, want = decode(blob, torch.device("cuda")).page, decode(blob).page
        assert torch.equal(got.k.cpu(), want.k) and torch.equal(got.v.cpu(), want.v)

