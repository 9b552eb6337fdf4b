"""The Redis tier against a real redis-server: layout, rebuild on attach, sharing, outages."""

from __future__ import annotations

import logging
import signal
import time

import pytest
import redis
import torch

from kvtier.procs.redis import RedisProcess
from kvtier.codecs import encode
from kvtier.config import CodecConfig, TierConfig
from kvtier.types import Codec, Medium, Precision

from .helpers import PAGE_BYTES, StoreFactory, key, make_page, make_settings, tier, wait_until

NS = "tenant-a"


def stack(hot_pages: int = 4, cold_bytes: int = 64 * PAGE_BYTES) -> list[TierConfig]:
    return [
        tier("hot", Medium.DEVICE, Codec.NONE, hot_pages * PAGE_BYTES),
        tier("cold", Medium.HOST, Codec.INT4, cold_bytes),
        tier("remote", Medium.REDIS, Codec.INT4, 1024 * PAGE_BYTES),
    ]


def int4_close(got: torch.Tensor, want: torch.Tensor) -> bool:
    span = float(want.float().max() - want.float().min())
    return bool(((got.float() - want.float()).abs() <= span / 15 * 0.51 + 1e-2).all())


def test_remote_roundtrip_and_key_layout(make_store: StoreFactory, redis_url: str) -> None:
    store = make_store(make_settings(stack(), redis_url), start=True, mover=False)
    assert store.tier_names == ("hot", "cold", "remote")
    store.put(NS, [(key(0), make_page(0)), (key(1), make_page(1))], chain_positions=[5, 6])
    assert store.demote(NS, [key(0)], "remote") == [True]
    client = redis.Redis.from_url(redis_url)
    rkey = f"kvt:{NS}:{{{key(0).hex()}}}".encode()
    assert client.keys("kvt:*") == [rkey]
    assert client.type(rkey) == b"hash"
    fields = client.hgetall(rkey)
    assert int(fields[b"p"]) == 4 and int(fields[b"c"]) == 5
    assert int(fields[b"n"]) == PAGE_BYTES and int(fields[b"s"]) == len(fields[b"b"])
    got = store.get(NS, [key(0)])[0]
    assert got is not None and (got.tier, got.precision) == ("remote", Precision.INT4)
    assert int4_close(got.page.k, make_page(0).k) and int4_close(got.page.v, make_page(0).v)
    assert store.lookup(NS, [key(1), key(0)]).tiers == ["hot", "remote"]
    remote = store.stats().tiers[2]
    assert (remote.pages, remote.bytes, remote.up) == (1, len(fields[b"b"]), True)
    # promotion copies it up and leaves the shared copy for the other daemons
    assert store.promote(NS, [key(0)], "hot") == [True]
    assert client.keys("kvt:*") == [rkey]
    assert store.lookup(NS, [key(0)]).tiers == ["hot"]
    assert store.demote(NS, [key(0)], "remote") == [True]
    assert store.delete(NS, [key(0)]) == 1 and client.keys("kvt:*") == []
    # a delete removes the shared copy of a page held in memory too
    assert store.promote(NS, [key(1)], "hot") == [True]
    assert store.demote(NS, [key(1)], "remote") == [True]
    assert store.promote(NS, [key(1)], "hot") == [True]
    assert len(client.keys("kvt:*")) == 1
    assert store.delete(NS, [key(1)]) == 1 and client.keys("kvt:*") == []
    client.close()


def test_new_store_rebuilds_the_remote_index(make_store: StoreFactory, redis_url: str) -> None:
    settings = make_settings(stack(), redis_url)
    first = make_store(settings, start=True, mover=False)
    first.put(NS, [(key(i), make_page(i)) for i in range(3)], chain_positions=[0, 1, 2])
    first.put("other", [(key(9), make_page(9))])
    first.close(drain=True)
    second = make_store(settings, start=True, mover=False)  # a daemon restart
    assert second.lookup(NS, [key(0), key(1), key(2)]).tiers == ["remote"] * 3
    assert second.stats().tiers[2].pages == 4
    got = second.get(NS, [key(2)])[0]
    assert got is not None and got.precision is Precision.INT4
    assert int4_close(got.page.k, make_page(2).k)
    info = second.page_info(NS, key(1))
    assert info is not None and info.chain_position == 1 and info.nbytes == PAGE_BYTES
    assert second.get("other", [key(9)])[0] is not None


def test_shared_redis_and_a_key_deleted_elsewhere(make_store: StoreFactory,
                                                  redis_url: str) -> None:
    settings = make_settings(stack(), redis_url)
    a = make_store(settings, start=True, mover=False)
    b = make_store(settings, start=True, mover=False)
    a.put(NS, [(key(0), make_page(0)), (key(1), make_page(1))])
    assert a.demote(NS, [key(0), key(1)], "remote") == [True, True]
    # b attached before a wrote them, and still finds them in the shared tier
    assert b.lookup(NS, [key(0), key(1), key(2)]).tiers == ["remote", "remote", None]
    got = b.get(NS, [key(1)])[0]
    assert got is not None and got.tier == "remote"
    client = redis.Redis.from_url(redis_url)
    client.delete(f"kvt:{NS}:{{{key(0).hex()}}}")  # someone else removed it
    client.close()
    assert a.get(NS, [key(0)]) == [None]
    assert a.lookup(NS, [key(0)]).tiers == [None]
    assert a.promote(NS, [key(1)], "hot") == [True]
    got = b.get(NS, [key(1)])[0]  # a copied it up: the shared copy stays for b
    assert got is not None and got.tier == "remote"
    # a key another daemon deleted vanishes from lookups too (no stale "remote")
    assert b.lookup(NS, [key(0), key(1)]).tiers == [None, "remote"]


def test_redis_stopped_then_restarted(make_store: StoreFactory,
                                      private_redis: RedisProcess) -> None:
    settings = make_settings(stack(hot_pages=2, cold_bytes=2 * 200), private_redis.url)
    store = make_store(settings, start=True)
    store.put(NS, [(key(0), make_page(0)), (key(1), make_page(1))])
    assert store.demote(NS, [key(0), key(1)], "remote") == [True, True]
    private_redis.stop()
    t0 = time.monotonic()
    assert store.get(NS, [key(0), key(1)]) == [None, None]  # Redis-only pages: misses
    assert time.monotonic() - t0 < 2.0
    assert not store.redis_up
    # puts keep working: cold fills to its hard limit, then pages are evicted (remote_down)
    for i in range(2, 12):
        store.put(NS, [(key(i), make_page(i))])
    st = store.stats()
    cold, remote = st.tiers[1], st.tiers[2]
    assert not st.redis_up and not remote.up
    assert cold.evictions["remote_down"] > 0 and cold.bytes <= cold.capacity_bytes
    assert store.lookup(NS, [key(0)]).tiers == [None]
    assert store._mover is not None and store._mover.failures == 0  # noqa: SLF001
    # Redis comes back (empty: no persistence) and the tier follows by itself
    private_redis.start()
    wait_until(lambda: store.redis_up, timeout_s=10, what="redis tier back up")
    wait_until(lambda: store.stats().tiers[2].pages == 0, what="stale remote entries dropped")
    assert store.get(NS, [key(0)]) == [None]
    hot_keys = [key(i) for i in range(2, 12) if store.lookup(NS, [key(i)]).tiers[0] == "hot"]
    assert store.demote(NS, hot_keys[:1], "remote") == [True]
    got = store.get(NS, hot_keys[:1])[0]
    assert got is not None and got.tier == "remote"


def test_redis_hanging_times_out_instead(make_store: StoreFactory,
                                         private_redis: RedisProcess) -> None:
    settings = make_settings(stack(), private_redis.url)
    store = make_store(settings, start=True)
    store.put(NS, [(key(0), make_page(0))])
    assert store.demote(NS, [key(0)], "remote") == [True]
    assert private_redis.proc is not None
    private_redis.proc.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        assert store.get(NS, [key(0)]) == [None]
        assert time.monotonic() - t0 < 2.0  # the socket timeout, not a hang
        assert not store.redis_up
        assert store.lookup(NS, [key(0)]).tiers == [None]
    finally:
        private_redis.proc.send_signal(signal.SIGCONT)
    wait_until(lambda: store.redis_up, what="redis tier back up")
    got = store.get(NS, [key(0)])[0]
    assert got is not None and got.tier == "remote"


def test_corrupt_or_foreign_keys_are_never_served(make_store: StoreFactory,
                                                  redis_url: str) -> None:
    settings = make_settings(stack(), redis_url)
    store = make_store(settings, start=True, mover=False)
    store.put(NS, [(key(0), make_page(0)), (key(1), make_page(1))])
    assert store.demote(NS, [key(0), key(1)], "remote") == [True, True]
    client = redis.Redis.from_url(redis_url)
    rkey = f"kvt:{NS}:{{{key(0).hex()}}}"
    blob = bytearray(client.hget(rkey, "b") or b"")
    blob[len(blob) // 2] ^= 0x40  # one flipped bit in the payload
    client.hset(rkey, "b", bytes(blob))
    client.set("kvt:junk", b"x")  # keys under our prefix that are not pages
    client.set(f"kvt:{NS}:{{zz}}", b"x")
    client.set(f"kvt:{NS}:{{{key(5).hex()}}}", b"a string, not a hash")
    assert store.get(NS, [key(0)]) == [None]
    assert client.exists(rkey) == 0
    assert store.stats().tiers[2].evictions["corrupt"] == 1
    got = store.get(NS, [key(1)])[0]
    assert got is not None and got.tier == "remote"
    fresh = make_store(settings, start=True, mover=False)  # rebuild skips the junk
    assert fresh.stats().tiers[2].pages == 1
    assert fresh.get(NS, [key(5)]) == [None]
    client.close()


def test_a_full_view_forgets_entries_and_never_deletes_shared_pages(
        make_store: StoreFactory, redis_url: str) -> None:
    b4 = len(encode(make_page(0), Codec.INT4, CodecConfig()))
    settings = make_settings([
        tier("hot", Medium.DEVICE, Codec.NONE, 8 * PAGE_BYTES),
        tier("remote", Medium.REDIS, Codec.INT4, 2 * b4 + 8, high=0.9, low=0.5),
    ], redis_url)
    store = make_store(settings, start=True, mover=False)
    store.put(NS, [(key(i), make_page(i)) for i in range(5)])
    assert store.demote(NS, [key(i) for i in range(5)], "remote") == [True] * 5
    remote = store.stats().tiers[1]  # the daemon's view of the shared tier is full ...
    assert (remote.pages, remote.bytes, remote.evictions["capacity"]) == (2, 2 * b4, 3)
    client = redis.Redis.from_url(redis_url)
    assert len(client.keys("kvt:*")) == 5  # ... and Redis keeps every page
    store.rebalance()  # past 90%: the mover trims the view to 50%
    remote = store.stats().tiers[1]
    assert (remote.pages, remote.evictions["capacity"]) == (1, 4)
    assert len(client.keys("kvt:*")) == 5
    client.close()
    # lookups and gets ask Redis about what the view does not hold
    assert store.lookup(NS, [key(i) for i in range(5)]).tiers == ["remote"] * 5
    got = store.get(NS, [key(0)])[0]
    assert got is not None and got.tier == "remote"


def test_a_redis_that_does_not_answer_is_logged_once(make_store: StoreFactory,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Not only /readyz: the log says the Redis tier is unreachable, once per outage."""
    settings = make_settings(stack(), "redis://127.0.0.1:1/0")
    with caplog.at_level(logging.WARNING, logger="kvtier.store.redis_shards"):
        store = make_store(settings, start=True, mover=False)
        assert not store.redis_up
        time.sleep(1.1)  # past the retry interval: the mover's pass probes again
        store.rebalance()
    said = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(said) == 1 and "redis://127.0.0.1:1/0" in said[0], said


def test_a_single_server_down_at_start_is_down_until_it_answers(
        make_store: StoreFactory, private_redis: RedisProcess) -> None:
    """With cluster mode set off (no detection), a Redis that is down when the daemon starts
    stays down through later probes, and the tier comes up once the server answers."""
    settings = make_settings(stack(), private_redis.url)
    settings = settings.model_copy(update={
        "redis": settings.redis.model_copy(update={"cluster": False})})
    private_redis.stop()
    store = make_store(settings, start=True)
    assert not store.redis_up
    time.sleep(0.5)  # several retry intervals: the mover probes again and again
    assert not store.redis_up and not store.stats().tiers[2].up
    private_redis.start()
    wait_until(lambda: store.redis_up, timeout_s=10, what="redis tier up once it answers")
    store.put(NS, [(key(0), make_page(0))])
    assert store.demote(NS, [key(0)], "remote") == [True]
