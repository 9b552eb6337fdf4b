"""A TierStore whose hot tier is the CUDA device: pages live in the preallocated pool,
demotions quantize on the device and move only the blob to the host, promotions decode on
the device, and the blobs are the CPU codecs' bytes. No Redis."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
import torch
from codec_helpers import make_kv

from kvtier.codecs import decode, encode
from kvtier.config import CodecConfig, Settings, TierConfig
from kvtier.store.store import TierStore
from kvtier.store.tiers import Promoted
from kvtier.types import Codec, Medium, Page, Precision

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

NS = "gpu"
SHAPE = (8, 64, 8, 128)  # 2 MiB of fp16 K + V
PAGE_BYTES = 2 * 8 * 64 * 8 * 128 * 2


def _settings(hot_pages: int, pool_pages: int | None = None) -> Settings:
    return Settings(tiers=[
        TierConfig(name="hot", medium=Medium.DEVICE, codec=Codec.NONE,
                   capacity_bytes=hot_pages * PAGE_BYTES, high_watermark=1.0,
                   low_watermark=0.5),
        TierConfig(name="warm", medium=Medium.HOST, codec=Codec.INT8,
                   capacity_bytes=64 * PAGE_BYTES, high_watermark=1.0, low_watermark=0.5),
        TierConfig(name="cold", medium=Medium.HOST, codec=Codec.INT4A,
                   capacity_bytes=64 * PAGE_BYTES, high_watermark=1.0, low_watermark=0.5),
    ], codec=CodecConfig(), device="cuda",
        device_pool_bytes=None if pool_pages is None else pool_pages * (PAGE_BYTES + 512))


@pytest.fixture()
def store() -> Iterator[TierStore]:
    s = TierStore(_settings(16))
    s.start(mover=False)
    yield s
    s.close()


def _held(s: TierStore, tier: int) -> list[object]:
    snap = s._engine.snapshot()[tier]  # noqa: SLF001
    assert snap.held is not None
    return [snap.held[pid] for pid in snap.pages]


def test_pages_live_in_the_pool_with_no_allocation_per_page(store: TierStore) -> None:
    transfer = store._engine.device_transfer  # noqa: SLF001
    assert transfer is not None and transfer.pool.capacity_bytes >= 16 * PAGE_BYTES
    pages = [make_kv(SHAPE, torch.float16, start=0, seed=i) for i in range(8)]
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    store.put(NS, [(b"%d" % i, p) for i, p in enumerate(pages)])
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before  # every page went into the pool
    held = _held(store, 0)
    assert all(isinstance(h, Page) and transfer.pool.holds(h.k) for h in held)
    for i, p in enumerate(pages):
        got = store.get(NS, [b"%d" % i])[0]
        assert got is not None and torch.equal(got.page.k, p.k) and torch.equal(got.page.v, p.v)


@pytest.mark.parametrize("target,codec,most", [("warm", Codec.INT8, 0.53),
                                               ("cold", Codec.INT4A, 0.3)])
def test_demotion_moves_the_blob_and_its_bytes_are_the_cpu_blob(
        store: TierStore, target: str, codec: Codec, most: float) -> None:
    pages = [make_kv(SHAPE, torch.float16, start=64 * i, seed=20 + i) for i in range(4)]
    keys = [b"d%d" % i for i in range(4)]
    store.put(NS, list(zip(keys, pages)))
    before = store.device_transfer_stats()
    assert store.demote(NS, keys, target) == [True] * 4
    after = store.device_transfer_stats()
    moved = after["d2h_bytes"] - before["d2h_bytes"]
    assert after["d2h_pages"] - before["d2h_pages"] == 4
    assert moved <= most * 4 * PAGE_BYTES, moved / (4 * PAGE_BYTES)
    tier = 1 if target == "warm" else 2
    blobs = _held(store, tier)
    want = {encode(p, codec, CodecConfig()) for p in pages}
    assert set(blobs) == want  # byte for byte what the CPU codec writes
    assert moved == sum(len(b) for b in want)  # type: ignore[arg-type]
    gc.collect()
    assert store.device_transfer_stats()["pool_used_bytes"] == 0


def test_promotion_decodes_on_the_device(store: TierStore) -> None:
    page = make_kv(SHAPE, torch.bfloat16, start=0, seed=30)
    store.put(NS, [(b"p", page)])
    assert store.demote(NS, [b"p"], "cold") == [True]
    blob = _held(store, 2)[0]
    assert isinstance(blob, bytes)
    before = store.device_transfer_stats()
    assert store.promote(NS, [b"p"], "hot") == [True]
    after = store.device_transfer_stats()
    assert after["h2d_bytes"] - before["h2d_bytes"] == len(blob)
    back = _held(store, 0)[0]
    assert isinstance(back, Promoted) and back.page.k.is_cuda
    want = decode(blob).page
    assert torch.equal(back.page.k.cpu(), want.k) and torch.equal(back.page.v.cpu(), want.v)
    got = store.get(NS, [b"p"])[0]
    assert got is not None and got.precision is Precision.INT4 and got.tier == "hot"
    assert store.demote(NS, [b"p"], "cold") == [True]  # the blob is reused: nothing crosses
    assert store.device_transfer_stats()["d2h_bytes"] == after["d2h_bytes"]


def test_a_full_pool_makes_room_by_demoting() -> None:
    s = TierStore(_settings(hot_pages=16, pool_pages=3))
    s.start(mover=False)
    try:
        pages = [make_kv(SHAPE, torch.float16, start=0, seed=40 + i) for i in range(6)]
        for i, p in enumerate(pages):
            s.put(NS, [(b"f%d" % i, p)])
        tiers = s.lookup(NS, [b"f%d" % i for i in range(6)]).tiers
        assert tiers.count("hot") <= 3 and tiers[-1] == "hot", tiers
        assert s.device_transfer_stats()["pool_used_bytes"] <= 3 * (PAGE_BYTES + 512)
    finally:
        s.close()
