"""int4a: key bits allocated per channel on the int8 grid; the bytes follow from the int8 blob."""

from __future__ import annotations

import pytest
import torch
from codec_helpers import DTYPES, error_bound, make_kv, ulp

from kvtier.codecs import blob as blobfmt
from kvtier.codecs import codec, decode, encode, int4a, read_header, torch_reference, transcode
from kvtier.codecs.blob import HEADER_SIZE
from kvtier.codecs.layout import layout_of
from kvtier.config import CodecConfig
from kvtier.errors import CorruptPage, InvalidArgument
from kvtier.types import Codec, Page, Precision

P = CodecConfig()


def _wide_channels(shape: tuple[int, int, int, int], seed: int = 0, start: int = 0) -> Page:
    """K where channel 5 of every head is 40x wider than the rest (a real key's outlier
    channels are of that order), and channel 6 is 12x wider."""
    page = make_kv(shape, torch.float32, start=start, seed=seed)
    k = page.k.clone()
    k[..., 5] *= 40
    k[..., 6] *= 12
    return Page(k=k.to(torch.float16), v=page.v.to(torch.float16), start_position=start)


def _bits(blob: bytes) -> torch.Tensor:
    lay = layout_of(read_header(blob))
    payload = torch.frombuffer(bytearray(blob[HEADER_SIZE:]), dtype=torch.uint8)
    return int4a.read_bits(payload, lay).reshape(lay.L, lay.H, lay.D - lay.n_out)


def test_allocate_spends_exactly_four_bits_and_favours_wide_channels() -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.rand(5, 7, 63, generator=g, dtype=torch.float64) ** 6 * 1e4
    bits = int4a.allocate(w, 4 * 63)
    assert set(bits.unique().tolist()) <= set(range(2, 9))
    assert bool((bits.to(torch.int64).sum(-1) == 4 * 63).all())
    # a wider channel never gets fewer bits than a narrower one of the same row
    order = w.argsort(-1)
    assert bool((bits.gather(-1, order).diff(dim=-1) >= 0).all())
    assert bool((bits == 8).any()) and bool((bits == 2).any())
    flat = int4a.allocate(torch.ones(2, 10, dtype=torch.float64), 40)
    assert bool((flat == 4).all())  # equal channels: int4
    for budget in (2 * 63, 5 * 63 + 1, 8 * 63):
        assert bool((int4a.allocate(w, budget).to(torch.int64).sum(-1) == budget).all())


def test_key_bits_sets_the_budget_and_the_header_says_it() -> None:
    page = _wide_channels((2, 128, 2, 64), seed=5)
    k = page.k.double()
    sizes, errs = [], []
    for kb in (3.0, 4.0, 4.25, 5.0):
        params = CodecConfig(key_bits=kb)
        blob = encode(page, Codec.INT4A, params)
        h = read_header(blob)
        assert h.key_bits == round(kb * 63)
        assert int(_bits(blob).to(torch.int64).sum()) == 2 * 2 * h.key_bits
        assert transcode(encode(page, Codec.INT8, params), Codec.INT4A, params) == blob
        sizes.append(len(blob))
        errs.append(float((decode(blob).page.k.double() - k).square().mean()))
    assert sizes == sorted(sizes) and errs == sorted(errs, reverse=True)
    # other codecs carry no key budget; a header that says otherwise is corrupt
    b4 = bytearray(encode(page, Codec.INT4, P))
    b4[42] = 1
    with pytest.raises(CorruptPage):
        decode(blobfmt.seal(b4))


def test_wide_channels_get_eight_bits_and_the_size_is_int4_plus_the_map() -> None:
    page = _wide_channels((2, 128, 2, 64))
    blob = encode(page, Codec.INT4A, P)
    bits = _bits(blob)
    lay = layout_of(read_header(blob))
    # outlier channel 5 is kept as put (1% -> 1 channel); channel 6 is the widest quantized one
    assert lay.n_out == 1
    assert bool((bits[..., 5] == 8).all())  # kept channel index 5 is head dim 6
    int4 = encode(page, Codec.INT4, P)
    map_bytes = 2 * (2 * 63) // 2  # L * C' nibbles
    assert len(blob) == len(int4) + ((map_bytes + 7) & ~7)  # + the map, 8-byte aligned
    h = read_header(blob)
    assert h.codec is Codec.INT4A and h.precision is Precision.INT4


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape,start", [((2, 130, 3, 64), 1), ((1, 64, 2, 24), 9),
                                         ((3, 5, 1, 8), 64)])
def test_roundtrip_within_the_bound_of_each_channels_bits(dtype: str,
                                                          shape: tuple[int, int, int, int],
                                                          start: int) -> None:
    page = _wide_channels(shape, seed=sum(shape), start=start)
    page = Page(k=page.k.to(DTYPES[dtype]), v=page.v.to(DTYPES[dtype]), start_position=start)
    blob = encode(page, Codec.INT4A, P)
    got = decode(blob).page
    h = read_header(blob)
    lay = layout_of(h)
    S = h.sink_tokens
    # sinks bit-exact, outlier channels bit-exact
    assert torch.equal(got.k[:, :S], page.k[:, :S]) and torch.equal(got.v[:, :S], page.v[:, :S])
    kb8, _ = error_bound(page, S, 8)
    _, vb4 = error_bound(page, S, 4)
    L, T, H, D = shape
    steps = torch.ones(L, H, D, dtype=torch.float64)  # outliers: kept as put (bound ~0)
    if lay.Tq:
        bits = _bits(blob).to(torch.int64)
        kept = torch.ones(L, H, D, dtype=torch.bool)
        kept.scatter_(-1, torch_reference.outlier_channels(page.k[:, S:].float(), lay.n_out), False)
        # |error| <= (255 / (2^b - 1) / 2 + 1) s: the b-bit step, then half an int8 step
        steps[kept] = 255.0 / (2.0 ** bits.reshape(-1).double() - 1) + 2
        assert torch.equal(got.k[:, S:][~kept[:, None].expand(L, T - S, H, D)],
                           page.k[:, S:][~kept[:, None].expand(L, T - S, H, D)])
    kb = kb8 * steps[:, None]
    for orig, x, bound in ((page.k, got.k, kb), (page.v, got.v, vb4)):
        err = (orig.double() - x.double()).abs()
        assert bool((err <= bound + ulp(x) + 1e-12).all())


def test_int4a_beats_int4_on_keys_with_wide_channels() -> None:
    page = _wide_channels((2, 256, 3, 64), seed=4, start=8)
    k = page.k.double()
    e4 = (decode(encode(page, Codec.INT4, P)).page.k.double() - k).square().mean()
    ea = (decode(encode(page, Codec.INT4A, P)).page.k.double() - k).square().mean()
    assert float(ea) < 0.7 * float(e4)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_transcode_from_int8_is_the_direct_encoding(dtype: str) -> None:
    page = _wide_channels((3, 200, 2, 64), seed=7, start=2)
    page = Page(k=page.k.to(DTYPES[dtype]), v=page.v.to(DTYPES[dtype]), start_position=2)
    direct = encode(page, Codec.INT4A, P)
    assert transcode(encode(page, Codec.INT8, P), Codec.INT4A, P) == direct
    assert transcode(encode(page, Codec.NONE, P), Codec.INT4A, P) == direct
    assert transcode(direct, Codec.INT4A, P) == direct
    for other in (Codec.INT4, Codec.INT8, Codec.NONE):
        with pytest.raises(InvalidArgument):
            transcode(direct, other, P)
    with pytest.raises(InvalidArgument):
        transcode(encode(page, Codec.INT4, P), Codec.INT4A, P)
    # a page that already went through int8 stays at INT4 precision on the way down
    promoted = encode(page, Codec.NONE, P, precision=Precision.INT8)
    assert read_header(transcode(promoted, Codec.INT4A, P)).precision is Precision.INT4


def test_torch_path_gives_the_same_bytes_and_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    page = _wide_channels((2, 70, 3, 24), seed=11, start=1)  # odd C': rows end in a half byte
    fast = encode(page, Codec.INT4A, P)
    dec = decode(fast).page
    monkeypatch.setattr(codec, "_kernels_run_on", lambda device: False)  # the CUDA path
    assert encode(page, Codec.INT4A, P) == fast
    slow = decode(fast).page
    assert torch.equal(dec.k, slow.k) and torch.equal(dec.v, slow.v)


def test_a_forged_bit_map_is_refused() -> None:
    blob = encode(_wide_channels((1, 64, 1, 16)), Codec.INT4A, P)
    lay = layout_of(read_header(blob))
    off, _ = lay.section("kbits")
    low = blob[off] & 0x0F
    # not a width (1, 9), or a valid width that breaks the 4-bit budget
    for nibble in (0x1, 0x9, low + 1 if low < 8 else low - 1):
        bad = bytearray(blob)
        bad[off] = (bad[off] & 0xF0) | nibble
        with pytest.raises(CorruptPage):
            decode(blobfmt.seal(bad))  # a valid checksum: the map check must catch it


def test_pages_of_only_sinks_roundtrip_exactly() -> None:
    page = make_kv((2, 3, 2, 16), start=0)
    got = decode(encode(page, Codec.INT4A, P)).page
    assert torch.equal(got.k, page.k) and torch.equal(got.v, page.v)


def test_kernels_self_test_passes() -> None:
    assert int4a.self_test()


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape,start,params", [
    ((2, 70, 2, 128), 0, CodecConfig()),
    ((1, 130, 1, 24), 2, CodecConfig(outlier_fraction=0.0, min_outlier_channels=0)),
    ((2, 33, 2, 40), 1, CodecConfig(group_size=7, outlier_fraction=0.05)),
    ((2, 64, 2, 63), 9, CodecConfig()),  # odd head_dim: no rotary pairs
])
def test_allocation_kernel_matches_the_torch_rule(dtype: str, shape: tuple[int, int, int, int],
                                                  start: int, params: CodecConfig) -> None:
    from kvtier.codecs.layout import layout_for_encode

    page = _wide_channels(shape, seed=sum(shape), start=start)
    page = Page(k=page.k.to(DTYPES[dtype]), v=page.v.to(DTYPES[dtype]), start_position=start)
    lay8 = layout_for_encode(Codec.INT8, dtype, page.shape, start, params)
    payload8 = torch_reference.encode_payload(page, lay8)
    budget = int4a.head_budget(4.0, lay8.D - lay8.n_out)
    want = int4a.allocate(int4a.key_weights(payload8, lay8), budget).reshape(lay8.L, -1)
    assert torch.equal(int4a._allocate_kernel(payload8, lay8, budget), want)


def test_selection_kernel_takes_the_stable_sorts_first_moves_among_ties() -> None:
    """The allocation's quickselect picks the same set as a stable descending sort, ties to
    the earlier move included (gains drawn from a few values, so most of them tie)."""
    import numpy as np

    from kvtier.codecs.cpu import int4a as kernels

    rng = np.random.default_rng(3)
    for n, levels in ((1, 1), (2, 1), (3, 2), (7, 3), (64, 4), (762, 5), (762, 1000)):
        gains = rng.integers(0, levels, n).astype(np.float64)
        want_sorted = np.argsort(-gains, kind="stable")
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            order = np.arange(n)
            kernels._select(gains, order, k)
            assert sorted(order.tolist()) == list(range(n))
            assert set(order[:k].tolist()) == set(want_sorted[:k].tolist()), (n, levels, k)


def test_radix_selection_takes_the_stable_sorts_first_moves_among_ties() -> None:
    """The allocation's selection (radix select on the gains' bits, ties to the earlier
    move) picks the set a stable descending sort does, also with most gains tied and with
    gains that differ only in their low bits."""
    import numpy as np

    from kvtier.codecs.cpu import int4a as kernels

    rng = np.random.default_rng(4)
    hist = np.empty(256, np.int64)
    for n, levels in ((1, 1), (2, 1), (3, 2), (7, 3), (64, 4), (762, 5), (762, 1000), (762, 0)):
        if levels:
            gains = rng.integers(0, levels, n).astype(np.float64)
        else:  # neighbours in the last bits
            gains = np.nextafter(1.0, 2.0, dtype=np.float64) * (1 + rng.integers(0, 9, n) * 2e-16)
        want_sorted = np.argsort(-gains, kind="stable")
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            order = np.arange(n)
            keys = np.empty(n, np.uint64)
            taken = np.empty(n, np.int64)
            kernels.take_first(gains, order, n, k, keys, hist, taken)
            assert set(np.nonzero(taken)[0].tolist()) == set(want_sorted[:k].tolist()), \
                (n, levels, k)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape,start,params", [
    ((2, 70, 2, 128), 0, CodecConfig()),
    ((1, 130, 1, 25), 2, CodecConfig(outlier_fraction=0.0, min_outlier_channels=0)),  # odd C'
    ((2, 33, 3, 40), 1, CodecConfig(group_size=7, outlier_fraction=0.05, key_bits=4.3)),
    ((1, 4, 1, 16), 0, CodecConfig()),  # only sinks: no codes
])
def test_whole_blob_kernels_match_the_torch_code(dtype: str, shape: tuple[int, int, int, int],
                                                 start: int, params: CodecConfig) -> None:
    """The one-dispatch CPU kernels (int8 -> int4a and back) write the torch code's bytes, in
    every page dtype (the outliers' peaks are read from the raw values)."""
    from kvtier.codecs.layout import layout_for_encode

    page = _wide_channels(shape, seed=sum(shape), start=start)
    page = Page(k=page.k.to(DTYPES[dtype]), v=page.v.to(DTYPES[dtype]), start_position=start)
    lay8 = layout_for_encode(Codec.INT8, dtype, page.shape, start, params)
    payload8 = torch_reference.encode_payload(page, lay8)
    slow, lay = int4a.from_int8(payload8, lay8, params.key_bits, kernels=False)
    buf, lay_k = int4a.from_int8_blob(bytes(HEADER_SIZE) + payload8.numpy().tobytes(), lay8,
                                      params.key_bits)
    assert lay_k == lay and bytes(buf[HEADER_SIZE:]) == slow.numpy().tobytes()
    back, lay8_k = int4a.to_int8_blob(bytes(buf), lay)
    want, lay8_t = int4a.to_int8(slow, lay, kernels=False)
    assert lay8_k == lay8_t and bytes(back[HEADER_SIZE:]) == want.numpy().tobytes()


def test_candidate_moves_hold_the_stable_sorts_first_moves() -> None:
    """The allocation keeps only the moves up to the last one of the first bits; the first
    ``k`` moves of a stable descending sort are all among them, for channel weights that tie,
    are zero or spread widely."""
    import numpy as np

    from kvtier.codecs.cpu import int4a as kernels

    rng = np.random.default_rng(5)
    for n in (1, 2, 5, 127):
        for weights in (rng.integers(0, 3, n).astype(np.float64), rng.random(n) * 0.1 + 1.0,
                        np.exp(rng.normal(0.0, 4.0, n)), np.zeros(n)):
            gains = (weights[None, :] * int4a._DROP[:, None]).reshape(-1)
            want = np.argsort(-gains, kind="stable")
            for k in sorted({0, 1, n, 2 * n, 3 * n - 1, gains.size}):
                order = np.empty(gains.size, np.int64)
                m = kernels._candidates(gains, n, k, order)
                assert m >= k and set(want[:k].tolist()) <= set(order[:m].tolist())
                kernels._select(gains, order[:m], k)
                assert set(order[:k].tolist()) == set(want[:k].tolist()), (n, k)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape,start,params", [
    ((2, 70, 2, 128), 0, CodecConfig()),
    ((1, 130, 1, 25), 2, CodecConfig(outlier_fraction=0.0, min_outlier_channels=0)),  # odd C'
    ((2, 33, 3, 40), 1, CodecConfig(group_size=7, outlier_fraction=0.05, key_bits=4.3)),
    ((3, 9, 2, 8), 0, CodecConfig(key_bits=7.9)),  # wide codes, rows of few bytes
    ((1, 4, 1, 16), 0, CodecConfig()),  # only sinks: no codes
])
def test_the_fused_decoder_equals_decoding_the_int8_blob(
        dtype: str, shape: tuple[int, int, int, int], start: int,
        params: CodecConfig) -> None:
    """The CPU decode of an int4a blob in one kernel gives the tensors of expanding it to
    int8 (``to_int8_blob``) and decoding that, bit for bit."""
    from kvtier.codecs.cpu import backend

    page = _wide_channels(shape, seed=sum(shape) + 1, start=start)
    page = Page(k=page.k.to(DTYPES[dtype]), v=page.v.to(DTYPES[dtype]), start_position=start)
    blob = encode(page, Codec.INT4A, params)
    lay = layout_of(read_header(blob))
    fused = decode(blob).page
    buf8, lay8 = int4a.to_int8_blob(blob, lay)
    k8, v8 = backend.decode(memoryview(buf8), lay8)
    assert fused.k.dtype == k8.dtype
    assert torch.equal(fused.k.view(torch.uint8), k8.view(torch.uint8))
    assert torch.equal(fused.v.view(torch.uint8), v8.view(torch.uint8))


def _random_bit_map(rng: object, L: int, C: int, per_row: int) -> object:
    import numpy as np

    assert isinstance(rng, np.random.Generator)
    bits = np.full((L, C), 2, np.uint8)
    for layer in range(L):
        left = per_row - 2 * C
        while left:
            c = int(rng.integers(0, C))
            if bits[layer, c] < 8:
                bits[layer, c] += 1
                left -= 1
    return bits.reshape(-1)


@pytest.mark.parametrize("C", [1, 7, 13, 127, 1016])
def test_the_bmi2_code_maps_give_the_portable_kernels_bytes(C: int) -> None:
    """``pext`` packing and ``pdep`` unpacking (with the float code maps) against the byte
    at a time kernels, over every (width, code) pair; on a CPU without BMI2 the intrinsics
    fall back to plain code, which this checks just the same."""
    import numpy as np

    from kvtier.codecs.cpu import int4a as k

    rng = np.random.default_rng(C)
    L, T = 3, 257
    bits = _random_bit_map(rng, L, C, per_row=min(8 * C, 4 * C + C // 3 + 1))
    rb = (int(bits[:C].sum()) + 7) // 8
    assert all(int(bits[i * C:(i + 1) * C].sum()) == int(bits[:C].sum()) for i in range(L))
    q8 = rng.integers(0, 256, L * T * C).astype(np.uint8)
    q8[:256] = np.arange(256)  # every code in the first row(s) of the first layer
    slow = np.empty(L * T * rb, np.uint8)
    fast = np.empty(L * T * rb, np.uint8)
    k.pack_keys(q8, L, T, C, bits, rb, slow, k.TO_B)
    k.pack_keys_bmi2(q8, L, T, C, bits, rb, fast, k.TO_B)
    assert np.array_equal(slow, fast)
    back = np.empty(L * T * C, np.uint8)
    k.unpack_keys(slow, L, T, C, bits, rb, back, k.TO_8)
    assert np.array_equal(back, k.TO_8[bits.reshape(L, 1, C).repeat(T, 1).reshape(-1),
                                       k.TO_B[bits.reshape(L, 1, C).repeat(T, 1).reshape(-1),
                                              q8]])


def test_the_float_code_maps_are_the_integer_ones() -> None:
    """``floor((2 q8 lv + 255) * fl(1/510))`` and ``floor((510 q + lv) * fl(1 / (2 lv)))`` in
    float32, as the BMI2 kernels compute them, for every width and code."""
    import numpy as np

    from kvtier.codecs.cpu import int4a as k

    q = np.arange(256, dtype=np.float32)
    for b in range(2, 9):
        lv = (1 << b) - 1
        to_b = ((q * np.float32(2 * lv) + np.float32(255.0)) * k._R510).astype(np.int32)
        assert np.array_equal(to_b, k.TO_B[b].astype(np.int32)), b
        qb = q[:lv + 1]
        to_8 = ((qb * np.float32(510.0) + np.float32(lv)) * np.float32(1.0 / (2 * lv))
                ).astype(np.int32)
        assert np.array_equal(to_8, k.TO_8[b, :lv + 1].astype(np.int32)), b


def test_pdep_and_pext_match_their_plain_code() -> None:
    import numpy as np
    from numba import njit

    from kvtier.codecs.cpu import intrinsics as ii

    @njit
    def both(x: int, m: int) -> tuple[int, int]:
        return ii.pdep(x, m), ii.pext(x, m)  # type: ignore[no-any-return]

    rng = np.random.default_rng(0)
    for _ in range(300):
        x, m = (np.uint64(v) for v in rng.integers(0, 2**63, 2))
        assert both(x, m) == (ii._soft_pdep(x, m), ii._soft_pext(x, m))
    assert ii._soft_pdep(np.uint64(0b1011), np.uint64(0xF0F0)) == 0xB0
    assert ii._soft_pext(np.uint64(0xB0), np.uint64(0xF0F0)) == 0b1011


def test_the_fused_decoder_reads_the_same_codes_both_ways() -> None:
    """The BMI2 row reader and the byte-pair reader of ``decode_page`` give one page."""
    import numpy as np

    from kvtier.codecs.cpu import backend
    from kvtier.codecs.cpu import int4a as k

    page = _wide_channels((2, 70, 3, 40), seed=5, start=1)
    blob = encode(page, Codec.INT4A, CodecConfig(key_bits=5.3))
    lay = layout_of(read_header(blob))
    sec, geo = int4a.page_plan(lay)
    arr = np.frombuffer(blob, np.uint8)
    outs = []
    for fast in (False, True):
        out, _, _ = backend._new_kv(lay)
        assert k.decode_page(arr, sec, geo, backend._MANT, k.TO_8_FLAT, out, fast) == 0
        outs.append(out)
    assert np.array_equal(outs[0], outs[1])
