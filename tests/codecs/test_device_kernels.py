"""The device codec kernels (Triton) hold the CPU kernels' bytes, run here in Triton's
interpreter on CPU tensors (``tests/conftest.py`` turns it on without a CUDA device); on a
GPU the same checks run on the device (``tests/gpu``).

The interpreter checks the kernels' logic (indexing, masks, packing, the grid, the bit
allocation) with numpy arithmetic; what only the device can show (its rounding without fused
multiply-adds, float64 division, the barriers between phases) is left to ``tests/gpu``.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from codec_helpers import DTYPES, make_kv

from kvtier.codecs import decode, encode, read_header, transcode
from kvtier.codecs import device as accel
from kvtier.codecs.blob import HEADER_SIZE
from kvtier.codecs.layout import layout_for_encode, layout_of
from kvtier.config import CodecConfig
from kvtier.errors import CorruptPage
from kvtier.types import Codec, Page

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="runs the kernels in Triton's interpreter (CPU only; tests/gpu runs them on CUDA)")

P = CodecConfig()
SHAPES = [
    ((2, 37, 2, 32), 0),   # sinks, a short last K group, one outlier a head
    ((1, 64, 3, 24), 9),   # H*D = 72: a short last V group; odd C' = 3*23
    ((3, 5, 1, 8), 64),    # tokens < group: K groups clipped to 5 tokens
    ((2, 20, 2, 15), 1),   # odd head_dim: no rotary pairs, odd row widths
    ((1, 3, 2, 8), 0),     # every token a sink
    ((2, 20, 2, 1), 0),    # head_dim 1: every channel an outlier, no kept channel
]


def _launch():  # type: ignore[no-untyped-def]
    from kvtier.codecs.cuda import launch
    return launch


def _payload(blob: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(blob[HEADER_SIZE:]), dtype=torch.uint8)


def _wide(page: Page) -> Page:
    """K with channels 40x and 12x wider than the rest (int4a gives them more bits)."""
    k = page.k.float().clone()
    k[..., 5 % k.shape[-1]] *= 40
    k[..., 6 % k.shape[-1]] *= 12
    return Page(k=k.to(page.k.dtype), v=page.v, start_position=page.start_position)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape,start", SHAPES)
def test_kernels_give_the_cpu_bytes(dtype: str, shape: tuple[int, int, int, int],
                                    start: int) -> None:
    launch = _launch()
    page = _wide(make_kv(shape, DTYPES[dtype], start=start, seed=11))
    for codec in (Codec.INT8, Codec.INT4):
        lay = layout_for_encode(codec, dtype, shape, start, P)
        want = encode(page, codec, P)
        assert launch.encode(page.k, page.v, lay).numpy().tobytes() == want[HEADER_SIZE:]
    want = encode(page, Codec.INT4A, P)
    lay8 = layout_for_encode(Codec.INT8, dtype, shape, start, P)
    got = launch.encode_int4a(page.k, page.v, lay8, layout_of(read_header(want)))
    assert got.numpy().tobytes() == want[HEADER_SIZE:]
    b8 = encode(page, Codec.INT8, P)
    lay8 = layout_of(read_header(b8))
    for target, fn in ((Codec.INT4, accel.int4_from_int8),
                       (Codec.INT4A, lambda p, lay: accel.int4a_from_int8(p, lay, P.key_bits))):
        want = transcode(b8, target, P)
        got, lay = fn(_payload(b8), lay8)  # type: ignore[operator]
        assert got.numpy().tobytes() == want[HEADER_SIZE:], target
        assert lay == layout_of(read_header(want))
    for codec in (Codec.INT8, Codec.INT4, Codec.INT4A):
        blob = encode(page, codec, P)
        k, v = launch.decode(_payload(blob), layout_of(read_header(blob)))
        cpu = decode(blob).page
        assert torch.equal(k, cpu.k) and torch.equal(v, cpu.v), codec


class _GarbageTorch:
    """torch, but ``empty`` hands out memory full of garbage (NaN, 0xAB...): every byte of a
    payload and every scratch value a kernel reads must have been written by the kernels."""

    def __getattr__(self, name: str) -> object:
        return getattr(torch, name)

    @staticmethod
    def empty(*shape: object, dtype: torch.dtype = torch.float32, **kw: object) -> torch.Tensor:
        t = torch.empty(*shape, dtype=dtype, **kw)  # type: ignore[call-overload]
        return t.fill_(float("nan") if dtype.is_floating_point else 0x5B if dtype != torch.uint8
                       else 0xAB)


def test_every_byte_is_written(monkeypatch: pytest.MonkeyPatch) -> None:
    launch = _launch()
    monkeypatch.setattr(launch, "torch", _GarbageTorch())
    launch._gap_index.cache_clear()  # noqa: SLF001
    for shape, start in (((2, 37, 2, 32), 0), ((1, 3, 2, 8), 0), ((2, 20, 2, 15), 1),
                         ((2, 20, 2, 1), 0)):
        page = _wide(make_kv(shape, torch.bfloat16, start=start, seed=5))
        for codec in (Codec.INT8, Codec.INT4):
            lay = layout_for_encode(codec, "bfloat16", shape, start, P)
            got = launch.encode(page.k, page.v, lay)
            assert got.numpy().tobytes() == encode(page, codec, P)[HEADER_SIZE:], (shape, codec)
        b8 = encode(page, Codec.INT8, P)
        lay8 = layout_of(read_header(b8))
        b4a = encode(page, Codec.INT4A, P)
        got = launch.encode_int4a(page.k, page.v, lay8, layout_of(read_header(b4a)))
        assert got.numpy().tobytes() == b4a[HEADER_SIZE:], shape
        got, _ = accel.int4a_from_int8(_payload(b8), lay8, P.key_bits)
        assert got.numpy().tobytes() == transcode(b8, Codec.INT4A, P)[HEADER_SIZE:], shape
        got, _ = accel.int4_from_int8(_payload(b8), lay8)
        assert got.numpy().tobytes() == transcode(b8, Codec.INT4, P)[HEADER_SIZE:], shape
        for blob in (b8, encode(page, Codec.INT4A, P)):
            k, v = launch.decode(_payload(blob), layout_of(read_header(blob)))
            cpu = decode(blob).page
            assert torch.equal(k, cpu.k) and torch.equal(v, cpu.v)
    launch._gap_index.cache_clear()  # noqa: SLF001


def test_a_batch_is_its_pages() -> None:
    launch = _launch()
    pages = [make_kv((2, 20, 2, 16), torch.bfloat16, start=2, seed=s) for s in range(3)]
    lay = layout_for_encode(Codec.INT4, "bfloat16", (2, 20, 2, 16), 2, P)
    k = torch.stack([p.k for p in pages])
    v = torch.stack([p.v for p in pages])
    out = launch.encode(k, v, lay)
    assert out.shape == (3, lay.payload_nbytes)
    for i, p in enumerate(pages):
        assert out[i].numpy().tobytes() == encode(p, Codec.INT4, P)[HEADER_SIZE:]
    kk, vv = torch.empty_like(k), torch.empty_like(v)
    launch.decode(out, lay, kk, vv)
    for i, p in enumerate(pages):
        want = decode(encode(p, Codec.INT4, P)).page
        assert torch.equal(kk[i], want.k) and torch.equal(vv[i], want.v)


def test_device_blob_seals_to_the_blob_encode_gives() -> None:
    page = make_kv((2, 24, 2, 16), torch.float16, start=0, seed=2)
    for codec in (Codec.NONE, Codec.INT8, Codec.INT4, Codec.INT4A):
        dblob = accel.encode_on_device(page, codec, P)
        assert accel.seal(dblob, dblob.payload.numpy().tobytes()) == encode(page, codec, P)


def test_check_payload_refuses_a_forged_bit_map() -> None:
    blob = bytearray(encode(make_kv((1, 40, 2, 16), start=0), Codec.INT4A, P))
    lay = layout_of(read_header(blob))
    accel.check_payload(blob, lay)
    off, _ = lay.section("kbits")
    blob[off] = 0xFF  # two channels of 15 bits
    with pytest.raises(CorruptPage, match="bit map"):
        accel.check_payload(blob, lay)


def test_int4_with_odd_v_groups_is_left_to_the_reference() -> None:
    """A byte of V's int4 codes would hold two groups' codes, which two programs would write:
    the launcher refuses such layouts and the device path encodes them with the reference."""
    launch = _launch()
    odd = layout_for_encode(Codec.INT4, "float16", (1, 8, 2, 16), 0, CodecConfig(group_size=5))
    assert not launch.supports(odd)
    assert not launch.supports(dataclasses.replace(odd, codec=Codec.INT4A))
    assert launch.supports(layout_for_encode(Codec.INT8, "float16", (1, 8, 2, 16), 0,
                                             CodecConfig(group_size=5)))
    assert launch.supports(layout_for_encode(Codec.INT4, "float16", (1, 8, 2, 16), 0, P))
    page = make_kv((1, 8, 2, 16), torch.float16, start=0, seed=3)
    with pytest.raises(ValueError, match="even V groups"):
        launch.encode(page.k, page.v, odd)


def test_cpu_pages_never_take_the_kernels() -> None:
    assert not accel.available(torch.device("cpu"))


def test_kernels_compile_for_the_device_without_fma() -> None:
    """Every kernel variant compiles for sm_90 here (Triton's LLVM and ptxas, no GPU), and its
    PTX holds no fused multiply-add and no approximate division (see kernel_build.py)."""
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("kernel_build.py")
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count("\n") == 3 * 8 + 3, run.stdout


@pytest.mark.parametrize("fill", ["zeros", "equal"])
def test_ties_in_the_key_bit_allocation(fill: str) -> None:
    """Pages whose channels all weigh the same (every gain tied) or nothing (K all zero):
    the moves are taken in move order, as the host's stable sort takes them."""
    page = make_kv((2, 40, 2, 32), torch.float16, start=0, seed=4)
    k = torch.zeros_like(page.k) if fill == "zeros" else \
        torch.linspace(-1, 1, 40).repeat_interleave(2 * 32).reshape(1, 40, 2, 32).repeat(
            2, 1, 1, 1).to(torch.float16)
    page = Page(k=k, v=page.v, start_position=0)
    b8 = encode(page, Codec.INT8, P)
    for params in (P, CodecConfig(key_bits=3.5)):  # 3.5: ties straddle the last move taken
        got, _ = accel.int4a_from_int8(_payload(b8), layout_of(read_header(b8)),
                                       params.key_bits)
        assert got.numpy().tobytes() == encode(page, Codec.INT4A, params)[HEADER_SIZE:]


def test_no_kernel_specializes_on_an_integer_argument() -> None:
    """Triton compiles a variant per pattern of integer arguments that are 1 or divisible by
    16 unless told not to: with offsets that change with the page shape, that would be a
    compilation (seconds) per new shape on the device."""
    import subprocess
    import sys

    code = (
        "import os; os.environ.pop('TRITON_INTERPRET', None)\n"
        "from kvtier.codecs.cuda import encode as e, decode as d, transcode as t\n"
        "for fn in (e.encode_bounds, e.encode_codes, e.pack_m12, d.decode_page, t.int4_from_int8,\n"
        "           t.int4a_bits, t.int4a_from_int8):\n"
        "    loose = [p.name for p in fn.params if not p.is_constexpr and not p.do_not_specialize\n"
        "             and not p.name.endswith('ptr') and p.name not in\n"
        "             ('scr_f', 'scr_i', 'scr_d', 'spans')]\n"
        "    assert not loose, (fn.__name__, loose)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
