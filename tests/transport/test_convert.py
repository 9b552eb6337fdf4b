"""Wire conversions: the NaN/Inf bit check and put-stream reassembly at any chunk boundary."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvtier.config import Settings
from kvtier.errors import InvalidArgument
from kvtier.finite import check_finite
from kvtier.store.buffers import BufferPool
from kvtier.transport.cache.convert import PutAssembler, check_header, chunks
from kvtier_proto.v1 import cache_pb2 as pb


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan"), -float("nan")])
def test_check_finite_finds_every_nonfinite(dtype: torch.dtype, bad: float) -> None:
    name = str(dtype).removeprefix("torch.")
    big = torch.finfo(dtype).max
    ok = torch.tensor([0.0, -0.0, 1.5, -2.0, big, -big, torch.finfo(dtype).tiny], dtype=dtype)
    check_finite(memoryview(ok.view(torch.uint8).numpy().tobytes()), name, "k")
    t = torch.cat([ok, torch.tensor([bad], dtype=dtype)])
    with pytest.raises(InvalidArgument, match="k: k holds NaN or Inf"):
        check_finite(memoryview(t.view(torch.uint8).numpy().tobytes()), name, "k")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_check_finite_at_every_position_length_and_alignment(dtype: torch.dtype) -> None:
    """Whole 64-bit words, the 1-3 values after them, and buffers starting off alignment."""
    name = str(dtype).removeprefix("torch.")
    rng = np.random.default_rng(1)
    for n in range(1, 14):
        vals = torch.from_numpy(rng.standard_normal(n).astype(np.float32) * 1e3).to(dtype)
        raw = bytes(3) + vals.view(torch.uint8).numpy().tobytes()
        check_finite(memoryview(raw)[3:], name, "v")  # starts 3 bytes off a word
        for i in range(n):
            for bad in (float("inf"), float("nan")):
                t = vals.clone()
                t[i] = bad
                raw = bytes(3) + t.view(torch.uint8).numpy().tobytes()
                with pytest.raises(InvalidArgument, match="v holds NaN or Inf"):
                    check_finite(memoryview(raw)[3:], name, "v")
    big = torch.full((1 << 16,), torch.finfo(dtype).max, dtype=dtype)  # exponent one below
    check_finite(memoryview(big.view(torch.uint8).numpy()), name, "v")


def _header(key: bytes, shape: tuple[int, ...]) -> pb.PageHeader:
    n = 2 * int(np.prod(shape))
    return pb.PageHeader(key=key, dtype="float16", shape=list(shape), k_len=n, v_len=n)


@pytest.mark.parametrize("chunk", [7, 4096, 3000, 1 << 20])
def test_put_assembler_rebuilds_pages_from_any_chunking(chunk: int) -> None:
    s = Settings()
    rng = np.random.default_rng(0)
    shapes = [(1, 4, 2, 8), (2, 16, 2, 64), (1, 1, 1, 1)]
    tensors = [(rng.standard_normal(sh).astype(np.float16),
                rng.standard_normal(sh).astype(np.float16)) for sh in shapes]
    asm = PutAssembler(s, BufferPool())
    asm.add_headers([check_header(_header(b"p%d" % i, sh), s) for i, sh in enumerate(shapes)])
    parts = [memoryview(a.tobytes()) for kv in tensors for a in kv]
    for piece in chunks(parts, chunk):
        assert len(piece) <= chunk
        asm.feed(piece)
    asm.finish()
    assert [h.key for h, _ in asm.pages] == [b"p0", b"p1", b"p2"]
    for (k, v), (_, page) in zip(tensors, asm.pages):
        assert np.array_equal(page.k.numpy(), k) and np.array_equal(page.v.numpy(), v)


def test_put_assembler_refuses_short_and_long_streams() -> None:
    s = Settings()
    asm = PutAssembler(s, BufferPool())
    asm.add_headers([check_header(_header(b"a", (1, 1, 1, 4)), s)])
    asm.feed(bytes(10))
    with pytest.raises(InvalidArgument, match="data: put stream ended after 10 of the 16"):
        asm.finish()
    with pytest.raises(InvalidArgument, match="more bytes than its page headers"):
        asm.feed(bytes(7))
