"""The device tier's preallocated pool: the allocator's bookkeeping, block lifetimes, and a
store whose hot tier lives in a pool (in host memory here: the same code as on a GPU)."""

from __future__ import annotations

import gc

import pytest
import torch

from kvtier.errors import CapacityExhausted
from kvtier.store.device_pool import ALIGN, BlockAllocator, DevicePool
from kvtier.store.store import TierStore
from kvtier.store.tiers import Promoted, Stored
from kvtier.types import Codec, Medium, Page, Precision

from .helpers import PAGE_BYTES, StoreFactory, key, make_page, make_settings, tier

NS = "pool"
BLOCK = 2 * ALIGN  # a test page's block: K and V of 128 bytes, each aligned to 256


def test_allocator_best_fit_merges_and_refuses() -> None:
    a = BlockAllocator(10 * ALIGN)
    blocks = [a.alloc(ALIGN) for _ in range(10)]
    assert blocks == [i * ALIGN for i in range(10)]
    assert a.alloc(1) is None  # full: no room is an answer, not an error
    for b in (1, 2, 5, 6, 7):
        a.free(blocks[b] or 0)
    st = a.stats()
    assert st.used_bytes == 5 * ALIGN and st.free_extents == 2
    assert st.largest_free_bytes == 3 * ALIGN
    assert a.alloc(ALIGN + 1) == 1 * ALIGN  # best fit: the extent of two, not the one of three
    a.free(1 * ALIGN)
    a.free(blocks[3] or 0)
    a.free(blocks[4] or 0)  # 1..7 merged into one extent
    assert a.stats().free_extents == 1 and a.stats().largest_free_bytes == 7 * ALIGN
    assert a.alloc(7 * ALIGN) == ALIGN
    with pytest.raises(ValueError, match="not an allocated block"):
        a.free(2 * ALIGN)
    with pytest.raises(ValueError):
        a.alloc(0)


def test_allocator_survives_a_random_workload() -> None:
    g = torch.Generator().manual_seed(0)
    a = BlockAllocator(1 << 20)
    live: dict[int, int] = {}
    for _ in range(3000):
        if live and torch.rand(1, generator=g).item() < 0.45:
            start = list(live)[int(torch.randint(len(live), (1,), generator=g))]
            a.free(start)
            del live[start]
            continue
        n = int(torch.randint(1, 40_000, (1,), generator=g))
        start = a.alloc(n)
        if start is None:
            assert a.stats().largest_free_bytes < n
            continue
        end = start + n
        assert all(end <= s or start >= s + m for s, m in live.items()), "overlapping blocks"
        assert start % ALIGN == 0 and end <= a.capacity
        live[start] = -(-n // ALIGN) * ALIGN
    assert a.stats().used_bytes == sum(live.values())
    for start in list(live):
        a.free(start)
    assert a.stats().free_extents == 1 and a.stats().largest_free_bytes == a.capacity


def test_a_block_is_free_when_both_tensors_are_gone() -> None:
    pool = DevicePool(4 * BLOCK, torch.device("cpu"))
    kv = pool.new_kv(torch.float16, (1, 8, 1, 8))
    assert kv is not None
    k, v = kv
    assert pool.holds(k) and pool.holds(v) and not pool.holds(torch.zeros(3))
    assert pool.stats().used_bytes == BLOCK
    del kv, k
    gc.collect()
    assert pool.stats().used_bytes == BLOCK  # V still holds the block
    del v
    gc.collect()
    assert pool.stats().used_bytes == 0
    pages = [pool.new_kv(torch.float16, (1, 8, 1, 8)) for _ in range(5)]
    assert pages[-1] is None and all(p is not None for p in pages[:4])


def _held(store: TierStore, tier: int) -> list[Stored]:
    """What ``tier`` holds, in the index's order of its pages."""
    snap = store._engine.snapshot()[tier]  # noqa: SLF001
    assert snap.held is not None
    return [snap.held[pid] for pid in snap.pages]


def _pooled_store(make_store: StoreFactory, hot_pages: int, pool_pages: int):  # type: ignore[no-untyped-def]
    settings = make_settings([
        tier("hot", Medium.DEVICE, Codec.NONE, hot_pages * PAGE_BYTES),
        tier("warm", Medium.HOST, Codec.INT8, 64 * PAGE_BYTES),
        tier("cold", Medium.HOST, Codec.INT4A, 64 * PAGE_BYTES),
    ], device_pool_bytes=pool_pages * BLOCK)
    return make_store(settings.model_copy(update={"device": "cpu"}))


def test_hot_pages_live_in_the_pool_and_leave_it(make_store: StoreFactory) -> None:
    store = _pooled_store(make_store, hot_pages=8, pool_pages=8)
    transfer = store._engine.device_transfer  # noqa: SLF001
    assert transfer is not None
    pages = [make_page(i) for i in range(3)]
    store.put(NS, [(key(i), p) for i, p in enumerate(pages)])
    held = _held(store, 0)
    assert all(isinstance(h, Page) and transfer.pool.holds(h.k) for h in held)
    assert not any(h.k is p.k for h, p in zip(held, pages))  # a put never aliases the caller
    del held
    assert store.device_transfer_stats()["pool_used_bytes"] == 3 * BLOCK
    raw = store.get_raw(NS, [key(0)])[0]
    assert raw is not None and bytes(raw.k) == pages[0].k.view(torch.uint8).numpy().tobytes()
    assert store.demote(NS, [key(1)], "cold") == [True]
    gc.collect()
    assert store.device_transfer_stats()["pool_used_bytes"] == 2 * BLOCK
    assert store.promote(NS, [key(1)], "hot") == [True]
    back = _held(store, 0)[-1]
    assert isinstance(back, Promoted) and transfer.pool.holds(back.page.k)
    got = store.get(NS, [key(1)])[0]
    assert got is not None and got.precision is Precision.INT4 and got.tier == "hot"
    del back
    store.delete(NS, [key(i) for i in range(3)])
    gc.collect()
    assert store.device_transfer_stats()["pool_used_bytes"] == 0


def test_a_full_pool_pushes_pages_down_to_make_room(make_store: StoreFactory) -> None:
    store = _pooled_store(make_store, hot_pages=16, pool_pages=4)  # the pool binds first
    pages = [make_page(i) for i in range(10)]
    for i, p in enumerate(pages):
        store.put(NS, [(key(i), p)])
    gc.collect()
    st = store.device_transfer_stats()
    assert st["pool_used_bytes"] <= 4 * BLOCK
    tiers = store.lookup(NS, [key(i) for i in range(10)]).tiers
    assert tiers.count("hot") <= 4 and tiers[-1] == "hot"
    for i, p in enumerate(pages):
        got = store.get(NS, [key(i)])[0]
        assert got is not None
        if got.tier == "hot":
            assert torch.equal(got.page.k, p.k)


def test_a_page_larger_than_the_pool_is_refused(make_store: StoreFactory) -> None:
    store = _pooled_store(make_store, hot_pages=64, pool_pages=1)
    with pytest.raises(CapacityExhausted, match="device pool"):
        store.put(NS, [(key(0), make_page(0, shape=(1, 64, 1, 8)))])


def test_a_reader_keeps_its_block_while_the_page_moves(make_store: StoreFactory) -> None:
    store = _pooled_store(make_store, hot_pages=8, pool_pages=8)
    store.put(NS, [(key(0), make_page(0))])
    reader = _held(store, 0)[0]
    assert isinstance(reader, Page)
    snapshot = reader.k.clone()
    assert store.demote(NS, [key(0)], "warm") == [True]
    for i in range(1, 9):  # the pool's other blocks, all taken
        store.put(NS, [(key(i), make_page(100 + i))])
    gc.collect()
    assert torch.equal(reader.k, snapshot)  # never overwritten under the reader
    used = store.device_transfer_stats()["pool_used_bytes"]
    del reader
    gc.collect()
    assert store.device_transfer_stats()["pool_used_bytes"] == used - BLOCK


def test_no_pool_on_a_cpu_device_unless_configured(make_store: StoreFactory) -> None:
    settings = make_settings([tier("hot", Medium.DEVICE, Codec.NONE, 8 * PAGE_BYTES),
                              tier("warm", Medium.HOST, Codec.INT8, 8 * PAGE_BYTES)])
    store = make_store(settings.model_copy(update={"device": "cpu"}))
    assert store._engine.device_transfer is None  # noqa: SLF001
    assert store.device_transfer_stats() == {}


def test_the_device_path_on_a_host_pool(make_store: StoreFactory) -> None:
    """The transfers' device path (encode where the page lies, stage the payload, seal; stage
    a blob's payload up, decode into the pool), run on a pool in host memory: what a GPU
    runs, less the streams and the kernels (the torch reference encodes here)."""
    from kvtier.codecs import decode, encode
    from kvtier.config import CodecConfig

    pages = [make_page(i, shape=(2, 24, 2, 16), start_position=0) for i in range(2)]
    small = _pooled_store(make_store, hot_pages=64, pool_pages=64)
    transfer = small._engine.device_transfer  # noqa: SLF001
    assert transfer is not None
    transfer.cuda = True  # route as for a device page
    small.put(NS, [(key(i), p) for i, p in enumerate(pages)])
    assert small.demote(NS, [key(0)], "cold") == [True]
    st = small.device_transfer_stats()
    blob = encode(pages[0], Codec.INT4A, CodecConfig())
    assert st["d2h_bytes"] == len(blob) and st["d2h_pages"] == 1
    assert _held(small, 2)[0] == blob
    assert small.promote(NS, [key(0)], "hot") == [True]
    up = small.device_transfer_stats()
    assert up["h2d_bytes"] - st["h2d_bytes"] == len(blob)
    assert up["h2d_pages"] - st["h2d_pages"] == 1
    got = small.get(NS, [key(0)])[0]
    want = decode(blob).page
    assert got is not None and torch.equal(got.page.k, want.k) and torch.equal(got.page.v, want.v)
