"""Threads and an asyncio loop hammer put/get/promote/demote/delete while the mover runs.

Each worker owns its keys, so it knows what must be there: a page it put and did not delete
must always be found (never lost), and every read must be the page it put — bit-exact at full
precision, within the codec's bound otherwise (half an int4/int8 step of the page's range, plus the 1/34
step that int8 -> int4 demotion on the codes may add, plus fp16 rounding; never torn, never another page's data). After
the run every page sits in exactly one tier and the byte accounting adds up.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Callable

import redis
import torch

from kvtier.store.results import GetResult
from kvtier.store.store import TierStore
from kvtier.store.tiers import stored_size
from kvtier.types import Codec, Medium, Page, Precision

from .helpers import PAGE_BYTES, StoreFactory, make_page, make_settings, tier

NS = "conc"
LEVELS = {Precision.INT8: 255, Precision.INT4: 15}


def check(got: GetResult, want: Page) -> None:
    assert got.page.k.dtype == want.k.dtype and got.page.shape == want.shape
    assert got.page.start_position == want.start_position
    for g, w in ((got.page.k, want.k), (got.page.v, want.v)):
        if got.precision is Precision.FULL:
            assert torch.equal(g, w), f"full-precision read from {got.tier} is not bit-exact"
        else:
            span = float(w.float().max() - w.float().min())
            bound = span / LEVELS[got.precision] * 0.55 + 1e-2
            err = float((g.float() - w.float()).abs().max())
            assert err <= bound, f"{got.precision.name} read from {got.tier}: {err} > {bound}"


class Worker:
    """Random operations over its own keys; returns nothing, raises on a wrong answer."""

    def __init__(self, store: TierStore, wid: int, n_keys: int, seed: int) -> None:
        self.store = store
        self.rng = random.Random(seed)
        self.keys = [b"w%d-k%d" % (wid, i) for i in range(n_keys)]
        self.pages = {k: make_page(wid * 1000 + i, start_position=i * 8)
                      for i, k in enumerate(self.keys)}
        self.present: set[bytes] = set()
        self.seen: set[tuple[str, Precision]] = set()
        self.ops = 0

    def step(self, call: Callable[..., object] | None = None) -> None:
        s, rng = self.store, self.rng
        k = rng.choice(self.keys)
        op = rng.random()
        if op < 0.35:
            s.put(NS, [(k, self.pages[k])])
            self.present.add(k)
        elif op < 0.75:
            ks = rng.sample(self.keys, 3)
            for kk, got in zip(ks, s.get(NS, ks), strict=True):
                if kk in self.present:
                    assert got is not None, f"{kk!r} was lost"
                    check(got, self.pages[kk])
                    self.seen.add((got.tier, got.precision))
                else:
                    assert got is None
        elif op < 0.8:
            tiers = s.lookup(NS, self.keys).tiers
            assert [t is not None for t in tiers] == [kk in self.present for kk in self.keys]
        elif op < 0.87:
            assert s.promote(NS, [k], rng.choice(s.tier_names)) == [k in self.present]
        elif op < 0.92:
            s.demote(NS, [k], rng.choice(s.tier_names[1:]))
        else:
            assert s.delete(NS, [k]) == (1 if k in self.present else 0)
            self.present.discard(k)
        self.ops += 1


def run_threads(workers: list[Worker], steps: int) -> list[BaseException]:
    errors: list[BaseException] = []

    def loop(w: Worker) -> None:
        try:
            for _ in range(steps):
                w.step()
        except BaseException as e:  # reported by the test thread
            errors.append(e)

    threads = [threading.Thread(target=loop, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    return_threads = threads
    for t in return_threads:
        t.join(120)
        assert not t.is_alive(), "a worker thread hung"
    return errors


async def run_async(workers: list[Worker], steps: int) -> None:
    async def loop(w: Worker) -> None:
        for _ in range(steps):
            await asyncio.to_thread(w.step)

    await asyncio.wait_for(asyncio.gather(*(loop(w) for w in workers)), timeout=120)


def assert_settled(store: TierStore, redis_url: str) -> None:
    e = store._engine  # noqa: SLF001 - the test inspects the invariants directly
    client = redis.Redis.from_url(redis_url)
    remote_keys = {k.decode() for k in client.scan_iter(match="kvt:*")}
    client.close()
    tiers = e.snapshot()  # one consistent picture of every tier
    for t, contents in enumerate(tiers):
        assert contents.reserved == 0
        members = set(contents.pages)
        backend = contents.held
        if backend is not None:
            assert len(backend) == len(members)
            total = 0
            for pid in members:
                data = backend.get(pid)
                assert data is not None
                total += stored_size(data)
                others = [u for u in range(len(tiers))
                          if u != t and tiers[u].held is not None
                          and tiers[u].held.get(pid) is not None]  # type: ignore[union-attr]
                assert not others, f"{pid} is in tiers {t} and {others}"
                assert e.redis is not None and e.redis.key(pid) not in remote_keys
            assert total == contents.used
        else:
            assert e.redis is not None
            assert {e.redis.key(p) for p in members} == remote_keys
    for pid in tiers[0].pages:
        assert tiers[0].states[pid].value == "resident"


def test_threads_and_asyncio_with_the_mover(make_store: StoreFactory, redis_url: str) -> None:
    settings = make_settings([
        tier("hot", Medium.DEVICE, Codec.NONE, 6 * PAGE_BYTES, high=0.8, low=0.4),
        tier("warm", Medium.HOST, Codec.INT8, 6 * 300, high=0.8, low=0.4),
        tier("cold", Medium.HOST, Codec.INT4, 6 * 200, high=0.8, low=0.4),
        tier("remote", Medium.REDIS, Codec.INT4, 10_000 * PAGE_BYTES),
    ], redis_url, mover_interval_s=0.005)
    store = make_store(settings, start=True)
    thread_workers = [Worker(store, w, 12, seed=w) for w in range(4)]
    async_workers = [Worker(store, 10 + w, 12, seed=10 + w) for w in range(3)]
    errors: list[BaseException] = []
    runner = threading.Thread(target=lambda: errors.extend(run_threads(thread_workers, 400)))
    runner.start()
    asyncio.run(run_async(async_workers, 250))
    runner.join(150)
    assert not runner.is_alive()
    if errors:
        raise errors[0]
    seen = set().union(*(w.seen for w in thread_workers + async_workers))
    assert {("hot", Precision.FULL), ("warm", Precision.INT8), ("cold", Precision.INT4),
            ("remote", Precision.INT4), ("hot", Precision.INT4)} <= seen
    st = store.stats()
    assert sum(t.demotions for t in st.tiers) > 20 and sum(t.promotions for t in st.tiers) > 5
    assert sum(sum(t.evictions.values()) for t in st.tiers) == st.tiers[0].evictions[
        "deleted"] + sum(t.evictions["deleted"] for t in st.tiers[1:])  # nothing evicted else
    assert store._mover is not None and store._mover.failures == 0  # noqa: SLF001
    store.close()
    assert_settled(store, redis_url)
    # and every page a worker still owns reads back right after the dust settled
    for w in thread_workers + async_workers:
        keys = sorted(w.present)
        if keys:
            for k, got in zip(keys, store.get(NS, keys), strict=True):
                assert got is not None
                check(got, w.pages[k])
