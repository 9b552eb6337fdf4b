"""TierStore basics: put/get/get_raw/lookup/delete, validation, limits, stats, the mover thread."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kvtier.errors import CapacityExhausted, InvalidArgument, PageTooLarge, UnknownTier
from kvtier.store.results import PutOutcome
from kvtier.types import Codec, Medium, Page, Precision

from .helpers import PAGE_BYTES, StoreFactory, key, make_page, make_settings, tier, wait_until

NS = "tenant-a"


def small_stack(hot_pages: int = 8, high: float = 0.9, low: float = 0.5) -> list:  # type: ignore[type-arg]
    return [
        tier("hot", Medium.DEVICE, Codec.NONE, hot_pages * PAGE_BYTES, high=high, low=low),
        tier("warm", Medium.HOST, Codec.INT8, 64 * PAGE_BYTES),
        tier("cold", Medium.HOST, Codec.INT4, 64 * PAGE_BYTES),
    ]


def test_put_get_is_bit_exact_private_and_idempotent(make_store: StoreFactory) -> None:
    store = make_store(make_settings(small_stack()))
    assert store.tier_names == ("hot", "warm", "cold")  # no redis url: no remote tier
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        page = make_page(1, dtype=dtype)
        name = str(dtype).encode()
        original = page.k.clone(), page.v.clone()
        assert store.put(NS, [(name, page)]) == [PutOutcome.STORED]
        page.k.fill_(0)  # the store keeps its own copy
        assert store.put(NS, [(name, make_page(2, dtype=dtype))]) == [PutOutcome.EXISTS]
        got = store.get(NS, [name])[0]
        assert got is not None and got.tier == "hot" and got.precision is Precision.FULL
        assert got.page.k.dtype == dtype and got.page.start_position == page.start_position
        assert torch.equal(got.page.k, original[0]) and torch.equal(got.page.v, original[1])
        got.page.v.fill_(0)  # and hands out copies
        again = store.get(NS, [name])[0]
        assert again is not None and torch.equal(again.page.v, original[1])


def test_owned_pages_are_adopted_and_others_copied(make_store: StoreFactory) -> None:
    """``put_checked(owned=True)``: the caller gives its memory up, so the hot tier on that
    device keeps the tensors as they are; without it the store copies (never aliases)."""
    from kvtier.types import PageId

    store = make_store(make_settings(small_stack()))
    mine, theirs = make_page(1), make_page(2)
    store.put_checked([PageId(NS, key(0)), PageId(NS, key(1))], [mine, theirs], [0, 1],
                      owned=True)
    borrowed = make_page(4)
    store.put_checked([PageId(NS, key(3))], [borrowed], [0])
    raw = store.get_raw(NS, [key(0), key(1), key(3)])
    addr = [None if r is None else (np.frombuffer(r.k, np.uint8).ctypes.data,
                                    np.frombuffer(r.v, np.uint8).ctypes.data) for r in raw]
    assert addr[0] == (mine.k.data_ptr(), mine.v.data_ptr())
    assert addr[1] == (theirs.k.data_ptr(), theirs.v.data_ptr())
    assert addr[2] is not None and addr[2][0] != borrowed.k.data_ptr()
    borrowed.k.fill_(0)
    got = store.get(NS, [key(3)])[0]
    assert got is not None and torch.equal(got.page.k, make_page(4).k)


def test_namespaces_are_isolated(make_store: StoreFactory) -> None:
    store = make_store(make_settings(small_stack()))
    store.put("a", [(key(1), make_page(1))])
    assert store.get("b", [key(1)]) == [None]
    assert store.lookup("b", [key(1)]).tiers == [None]
    assert store.delete("b", [key(1)]) == 0
    assert store.get("a", [key(1)])[0] is not None


def test_get_raw_serves_hot_pages_without_a_copy(make_store: StoreFactory) -> None:
    store = make_store(make_settings(small_stack()))
    page = make_page(3, dtype=torch.bfloat16)
    store.put(NS, [(key(0), page), (key(1), make_page(4))])
    store.demote(NS, [key(1)], "cold")
    raw = store.get_raw(NS, [key(0), key(1), key(9)])
    r0, r1 = raw[0], raw[1]
    assert r0 is not None and r1 is not None and raw[2] is None
    assert (r0.dtype, r0.shape, r0.tier) == ("bfloat16", page.shape, "hot")
    assert bytes(r0.k) == page.k.view(torch.uint8).numpy().tobytes()
    assert bytes(r0.v) == page.v.view(torch.uint8).numpy().tobytes()
    assert r0.k.readonly
    assert (r1.tier, r1.precision, r1.dtype) == ("cold", Precision.INT4, "float16")
    assert len(r1.k) == len(r1.v) == PAGE_BYTES // 2
    if not torch.cuda.is_available():  # host hot tier: a view of the stored tensor itself
        hot = store._engine.snapshot()[0]  # noqa: SLF001
        stored = hot.held[hot.pages[0]]  # type: ignore[index]
        assert isinstance(stored, Page)
        assert r0.k.obj is not None


def test_lookup_prefix_and_delete(make_store: StoreFactory) -> None:
    store = make_store(make_settings(small_stack()))
    store.put(NS, [(key(i), make_page(i)) for i in range(4)])
    store.demote(NS, [key(2)], "warm")
    res = store.lookup(NS, [key(0), key(1), key(2), key(3), key(7)])
    assert res.prefix_length == 4 and res.tiers == ["hot", "hot", "warm", "hot", None]
    assert store.delete(NS, [key(1), key(2), key(1), key(9)]) == 2
    res = store.lookup(NS, [key(0), key(1), key(2), key(3)])
    assert res.prefix_length == 1 and res.tiers == ["hot", None, None, "hot"]
    st = {t.name: t for t in store.stats().tiers}
    assert st["hot"].evictions["deleted"] == 1 and st["warm"].evictions["deleted"] == 1
    assert (st["hot"].pages, st["warm"].pages, st["warm"].bytes) == (2, 0, 0)


def test_bad_input_names_the_field(make_store: StoreFactory) -> None:
    store = make_store(make_settings(small_stack(hot_pages=2), max_page_bytes=4 * PAGE_BYTES))
    with pytest.raises(InvalidArgument, match="keys"):
        store.get(NS, [])
    with pytest.raises(InvalidArgument, match="key"):
        store.get(NS, [b""])
    with pytest.raises(InvalidArgument, match="namespace"):
        store.get("bad ns!", [key(0)])
    with pytest.raises(UnknownTier, match="tier: unknown tier 'lukewarm'"):
        store.promote(NS, [key(0)], "lukewarm")
    with pytest.raises(InvalidArgument, match="chain_positions"):
        store.put(NS, [(key(0), make_page(0))], chain_positions=[0, 1])
    with pytest.raises(InvalidArgument, match="page"):
        store.put(NS, [(key(0), "not a page")])  # type: ignore[list-item]
    mismatched = Page(k=make_page(0).k, v=make_page(0, shape=(1, 4, 1, 8)).v, start_position=0)
    with pytest.raises(InvalidArgument, match="v.shape"):
        store.put(NS, [(key(0), mismatched)])
    with pytest.raises(PageTooLarge, match="page"):
        store.put(NS, [(key(0), make_page(0, shape=(1, 64, 1, 8)))])
    # 3 x 256 bytes: allowed by max_page_bytes but larger than the whole hot tier
    with pytest.raises(CapacityExhausted, match="page"):  # nothing of the batch is stored
        store.put(NS, [(key(1), make_page(1)), (key(0), make_page(0, shape=(1, 24, 1, 8)))])
    assert store.lookup(NS, [key(1), key(0)]).tiers == [None, None]
    assert store.stats().tiers[0].bytes == 0


def test_set_tier_limits_validates_and_shrinks_at_once(make_store: StoreFactory) -> None:
    store = make_store(make_settings(small_stack(hot_pages=8)))
    store.put(NS, [(key(i), make_page(i)) for i in range(6)])
    with pytest.raises(UnknownTier):
        store.set_tier_limits("nope", capacity_bytes=1)
    with pytest.raises(InvalidArgument, match="low_watermark"):
        store.set_tier_limits("hot", low_watermark=0.95)
    with pytest.raises(InvalidArgument, match="capacity_bytes"):
        store.set_tier_limits("hot", capacity_bytes=0)
    st = store.set_tier_limits("hot", capacity_bytes=4 * PAGE_BYTES, high_watermark=0.8,
                               low_watermark=0.5)
    assert (st.capacity_bytes, st.high_watermark, st.low_watermark) == (4 * PAGE_BYTES, 0.8, 0.5)
    assert st.pages == 2 and st.bytes == 2 * PAGE_BYTES
    # one put is one chain: prefix-closed, it is cut from the tail (LRU alone would take 0-3)
    assert store.lookup(NS, [key(i) for i in range(6)]).tiers == [
        "hot", "hot", "warm", "warm", "warm", "warm"]


def test_stats_count_hits_misses_and_codec_time(make_store: StoreFactory) -> None:
    store = make_store(make_settings(small_stack()))
    store.put(NS, [(key(0), make_page(0)), (key(1), make_page(1))])
    store.demote(NS, [key(1)], "cold")
    store.get(NS, [key(0), key(1), key(5)])
    st = store.stats()
    hot, warm, cold = st.tiers
    assert (hot.hits, hot.misses) == (1, 2)
    assert (warm.hits, warm.misses) == (0, 2)
    assert (cold.hits, cold.misses) == (1, 1)
    assert (st.gets, st.get_hits, st.get_misses, st.puts, st.puts_stored) == (3, 2, 1, 2, 2)
    assert hot.demotions == 1 and cold.medium == "host" and cold.codec == "int4"
    secs, count = st.codec_seconds[("encode", "int4")]
    assert count == 1 and secs > 0
    assert st.codec_seconds[("decode", "int4")][1] == 1
    assert st.policy.name == "lru" and st.redis_up
    info = store.page_info(NS, key(0))
    assert info is not None and info.access_count == 2 and info.chain_position == 0
    assert info.stored_bytes == PAGE_BYTES and not math.isnan(info.score)
    assert store.page_info(NS, key(7)) is None


def test_mover_thread_demotes_past_the_high_watermark(make_store: StoreFactory) -> None:
    store = make_store(make_settings(small_stack(hot_pages=10, high=0.7, low=0.3)), start=True)
    store.put(NS, [(key(i), make_page(i)) for i in range(8)])
    wait_until(lambda: store.stats().tiers[0].pages == 3, what="mover to reach low watermark")
    tiers = store.lookup(NS, [key(i) for i in range(8)]).tiers
    assert tiers == ["hot"] * 3 + ["warm"] * 5  # one chain: demoted from its tail
    recorded = store.policy  # the policy got the access events via the mover
    assert recorded.name == "lru"


def test_policy_gets_events_and_a_failing_policy_falls_back(make_store: StoreFactory) -> None:
    from collections.abc import Sequence

    from kvtier.store.policy import AccessEvent, LRUPolicy, PageMeta

    class Recording(LRUPolicy):
        def __init__(self) -> None:
            self.events: list[AccessEvent] = []

        def record(self, events: Sequence[AccessEvent]) -> None:
            self.events.extend(events)

    class Broken(LRUPolicy):
        def score(self, pages: Sequence[PageMeta]) -> list[float]:
            raise RuntimeError("model not loaded")

    rec = Recording()
    store = make_store(make_settings(small_stack(hot_pages=2)), rec)
    store.put(NS, [(key(0), make_page(0)), (key(1), make_page(1))], chain_positions=[3, 4])
    store.get(NS, [key(1), key(7)])
    store.lookup(NS, [key(0)])
    assert rec.events == []  # nothing delivered on the data path
    store.rebalance()
    kinds = [(e.kind.value, e.page.key, e.tier_hit, e.chain_position) for e in rec.events]
    assert kinds == [("put", key(0), "hot", 3), ("put", key(1), "hot", 4),
                     ("get", key(1), "hot", 0), ("get", key(7), None, 1),
                     ("lookup", key(0), "hot", 0)]
    assert [e.seq for e in rec.events] == sorted(e.seq for e in rec.events)
    store.set_policy(Broken())
    store.put(NS, [(key(2), make_page(2))])  # make-room asks the broken policy: LRU instead
    # LRU's victim is 0, but 1 follows it in a chain (positions 3, 4): the tail 1 goes first
    assert store.lookup(NS, [key(0), key(1), key(2)]).tiers == ["hot", "warm", "hot"]


def test_concurrent_puts_of_one_key_store_it_once(make_store: StoreFactory) -> None:
    import threading

    store = make_store(make_settings(small_stack()))
    barrier = threading.Barrier(8)
    outcomes: list[PutOutcome] = []

    def put(seed: int) -> None:
        barrier.wait(5)
        outcomes.extend(store.put(NS, [(key(0), make_page(seed))]))

    threads = [threading.Thread(target=put, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(o.value for o in outcomes) == ["exists"] * 7 + ["stored"]
    hot = store.stats().tiers[0]
    assert (hot.pages, hot.bytes) == (1, PAGE_BYTES)
    got = store.get(NS, [key(0)])[0]
    assert got is not None and any(torch.equal(got.page.k, make_page(i).k) for i in range(8))
    assert store.close(drain=True) is None and store.drain() == 0  # no Redis tier: nothing
