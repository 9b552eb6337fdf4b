"""The CPU kernels agree with the pure-torch oracle bit for bit (bytes and tensors)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from codec_helpers import DTYPES, make_kv
from numba import njit

from kvtier.codecs import decode, encode, torch_reference, transcode, warmup
from kvtier.codecs.blob import HEADER_SIZE, read_header
from kvtier.codecs.cpu.intrinsics import bits_to_f32
from kvtier.codecs.cpu.rows import R17
from kvtier.codecs.layout import layout_for_encode, layout_of
from kvtier.config import CodecConfig
from kvtier.types import Codec, Page

SHAPES = [
    ((2, 70, 2, 128), 0),    # sinks, short last K group
    ((1, 64, 3, 24), 9),     # odd kept-channel count, short V group
    ((3, 5, 1, 8), 64),      # tokens < group
    ((2, 3, 2, 16), 1),      # every token a sink
    ((1, 130, 1, 256), 2),   # two K groups, two outliers per head
]


def _payload_ref(page: Page, codec: Codec, params: CodecConfig, dtype: str) -> bytes:
    lay = layout_for_encode(codec, dtype, page.shape, page.start_position, params)
    return bytes(torch_reference.encode_payload(page, lay).numpy().tobytes())


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape,start", SHAPES)
@pytest.mark.parametrize("codec", [Codec.NONE, Codec.INT8, Codec.INT4])  # int4a: via int8
def test_kernels_match_torch_oracle(dtype: str, shape: tuple[int, int, int, int], start: int,
                                    codec: Codec) -> None:
    params = CodecConfig(group_size=64)
    page = make_kv(shape, DTYPES[dtype], start=start, seed=sum(shape))
    blob = encode(page, codec, params)  # CPU tensors: the numba kernels
    assert blob[HEADER_SIZE:] == _payload_ref(page, codec, params, dtype)
    lay = layout_of(read_header(blob))
    rk, rv = torch_reference.decode_payload(
        torch.frombuffer(bytearray(blob[HEADER_SIZE:]), dtype=torch.uint8), lay)
    got = decode(blob).page
    assert torch.equal(got.k, rk) and torch.equal(got.v, rv)
    assert got.k.view(torch.uint8).numpy().tobytes() == rk.view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("group", [2, 7, 64, 200])
def test_kernels_match_oracle_for_other_group_sizes(group: int) -> None:
    params = CodecConfig(group_size=group, sink_tokens=3, outlier_fraction=0.05)
    page = make_kv((2, 33, 2, 40), torch.bfloat16, start=1, seed=group)
    for codec in (Codec.INT8, Codec.INT4):
        assert encode(page, codec, params)[HEADER_SIZE:] == \
            _payload_ref(page, codec, params, "bfloat16")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("codec", [Codec.INT8, Codec.INT4])
def test_large_pages_match_oracle(dtype: str, codec: Codec) -> None:
    page = make_kv((2, 67, 8, 128), DTYPES[dtype], start=2, seed=9)  # 1 MiB, 2 K groups
    params = CodecConfig()
    blob = encode(page, codec, params)
    assert blob[HEADER_SIZE:] == _payload_ref(page, codec, params, dtype)
    lay = layout_of(read_header(blob))
    rk, rv = torch_reference.decode_payload(
        torch.frombuffer(bytearray(blob[HEADER_SIZE:]), dtype=torch.uint8), lay)
    got = decode(blob).page
    assert torch.equal(got.k, rk) and torch.equal(got.v, rv)


def test_kernel_transcode_matches_torch_transcode() -> None:
    """transcode's int8 -> int4 rows are the torch reference's rule (``round(q8 / 17)``, then
    packed), half-byte row ends included."""
    from kvtier.codecs.pack import pack_int4

    page = make_kv((2, 65, 3, 24), start=0)  # odd C' (3 * 23): int4 rows end in a half byte
    b8 = encode(page, Codec.INT8, CodecConfig())
    fast = transcode(b8, Codec.INT4, CodecConfig())
    src, dst = layout_of(read_header(b8)), layout_of(read_header(fast))
    for name, width in (("kq", src.Ck), ("vq", src.HD)):
        off, n = src.section(name)
        q8 = torch.frombuffer(bytearray(b8[off:off + n]), dtype=torch.uint8)
        slow = pack_int4(torch_reference.int8_to_int4(q8.reshape(-1, width))).numpy().tobytes()
        doff, dn = dst.section(name)
        assert fast[doff:doff + dn] == slow
    assert decode(fast).page.k.dtype == torch.float16


def test_non_contiguous_pages_encode_like_contiguous() -> None:
    base = make_kv((2, 32, 4, 64), seed=4)
    view = Page(k=base.k[:, :, ::2], v=base.v[:, :, ::2], start_position=base.start_position)
    dense = Page(k=view.k.contiguous(), v=view.v.contiguous(), start_position=view.start_position)
    assert encode(view, Codec.INT8, CodecConfig()) == encode(dense, Codec.INT8, CodecConfig())


def test_warmup_self_tests_once_per_process() -> None:
    warmup()
    assert warmup() == 0.0  # compiled and self-tested already: free for every later store


@njit(cache=True)
def _count_r17_mismatches(lo_bits: int, hi_bits: int, sign: float) -> int:
    """How many float32 ``y = sign * bits_to_f32(u)``, ``lo_bits <= u < hi_bits``, round
    differently as ``y / 17`` and ``y * R17``."""
    bad = 0
    for u in range(lo_bits, hi_bits):
        y = np.float32(sign) * bits_to_f32(np.uint32(u))
        bad += np.rint(y / np.float32(17)) != np.rint(y * R17)
    return bad


def test_int4_reciprocal_matches_division_for_every_float32_in_range() -> None:
    """The int4 kernels multiply by R17 where the oracle divides by 17: the same integer for
    every float32 in [-3, 300] (about 2.2e9 values, ~4 s; outside that range both clamp
    alike)."""
    top = int(np.array([300.0], np.float32).view(np.uint32)[0]) + 1
    low = int(np.array([3.0], np.float32).view(np.uint32)[0]) + 1
    assert _count_r17_mismatches(0, top, 1.0) == 0
    assert _count_r17_mismatches(0, low, -1.0) == 0


def test_a_change_to_any_kernel_source_drops_every_cached_kernel(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """numba checks a cached kernel against its own file only; the package's stamp covers the
    helpers it inlines from other files too."""
    import kvtier.codecs.cpu as cpu_pkg

    (tmp_path / "rows.py").write_text("x = 1\n")
    (tmp_path / "int8_int4.py").write_text("y = 2\n")
    cache = tmp_path / "__pycache__"
    cache.mkdir()
    monkeypatch.setattr(cpu_pkg, "_HERE", tmp_path)
    kernel = cache / "int8_int4.encode_page-1.py311.nbi"
    kernel.write_bytes(b"compiled")
    cpu_pkg._drop_stale_kernels()  # no stamp yet: nothing known about what compiled it
    assert not kernel.exists()
    kernel.write_bytes(b"compiled")
    cpu_pkg._drop_stale_kernels()
    assert kernel.exists()  # same sources: kept
    (tmp_path / "rows.py").write_text("x = 3\n")  # a helper the kernel inlines changed
    cpu_pkg._drop_stale_kernels()
    assert not kernel.exists()
