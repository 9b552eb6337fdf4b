"""Lent pages: the daemon keeps a put's pages where they lie in the client's segment and hands
each range back through the return ring when it no longer uses it."""

from __future__ import annotations

import numpy as np
import pytest

from kvtier.daemon import Daemon
from kvtier_client import KVTierClient, Page

from .conftest import make_page, wait_for

MiB = 1 << 20


def _daemon_range(daemon: Daemon, c: KVTierClient) -> tuple[int, int]:
    session = c._shm.session
    assert session is not None
    mm = daemon._shm.get(session.id)._mm
    base = int(np.frombuffer(mm, np.uint8, 1).ctypes.data)
    return base, base + len(mm)


def _addr(buf: memoryview) -> int:
    return int(np.frombuffer(buf, np.uint8).ctypes.data)


def test_lent_pages_are_kept_without_a_copy_and_come_back(daemon: Daemon) -> None:
    store = daemon.context.store
    with KVTierClient(daemon.grpc_address, "lend", lend_bytes=4 * MiB) as c:
        pages = [make_page(i) for i in range(3)]
        assert c.put([b"a", b"b", b"c"], pages) == ["stored"] * 3
        session = c._shm.session
        assert session is not None and session.segment.lend is not None
        lend = session.segment.lend
        lo, hi = _daemon_range(daemon, c)
        for key, page in zip((b"a", b"b", b"c"), pages):
            raw = store.get_raw("lend", [key])[0]
            assert raw is not None and lo <= _addr(raw.k) < hi  # the segment's own bytes
            got = c.get([key])[0]
            assert got is not None and np.array_equal(got.k, page.k) \
                and np.array_equal(got.v, page.v)
        del raw
        held = lend.used_bytes
        assert held >= 3 * 2 * page.k.nbytes
        assert c.put([b"a"], [pages[0]]) == ["exists"]  # not kept: its range comes back
        c.delete([b"a", b"b"])
        assert wait_for(lambda: (session.segment.take_back(), lend.used_bytes)[1] < held / 2)
        assert c.get([b"c"])[0] is not None


def test_a_full_lend_area_falls_back_to_copies(daemon: Daemon) -> None:
    store = daemon.context.store
    with KVTierClient(daemon.grpc_address, "lend", lend_bytes=64 << 10) as c:
        page = make_page(1)  # 16 KiB: four fit
        keys = [b"k%d" % i for i in range(5)]
        for key in keys[:4]:
            assert c.put([key], [page]) == ["stored"]
        lo, hi = _daemon_range(daemon, c)
        inside = [lo <= _addr(r.k) < hi for r in store.get_raw("lend", keys) if r is not None]
        assert inside == [True] * 4
        assert c.put([keys[4]], [page]) == ["stored"]  # copied (the daemon then copies the
        raw = store.get_raw("lend", keys[4:])[0]       # four out: test_shm_relocate.py)
        assert raw is not None and not lo <= _addr(raw.k) < hi
        del raw
        assert all(g is not None and np.array_equal(g.v, page.v) for g in c.get(keys))


def test_a_lent_page_made_non_finite_by_its_client_is_dropped_on_demotion(
        daemon: Daemon) -> None:
    store = daemon.context.store
    with KVTierClient(daemon.grpc_address, "lend", lend_bytes=1 * MiB) as c:
        assert c.put([b"x"], [make_page(2)]) == ["stored"]
        raw = store.get_raw("lend", [b"x"])[0]
        assert raw is not None
        session = c._shm.session
        assert session is not None
        lo, _ = _daemon_range(daemon, c)
        off = _addr(raw.k) - lo
        del raw
        np.frombuffer(session.segment.view, np.float16, 1, off)[0] = np.inf  # its own bug
        assert store.demote("lend", [b"x"], "warm") == [False]  # corrupt: not encoded
        assert c.get([b"x"]) == [None]
        assert c.put([b"y"], [make_page(3)]) == ["stored"]  # the daemon carries on


def test_lending_is_refused_with_a_clear_error_for_a_bad_ring(daemon: Daemon) -> None:
    import grpc

    from kvtier_client.core import put_request, wire_pages
    from kvtier_proto.v1 import cache_pb2_grpc as pb_grpc

    with KVTierClient(daemon.grpc_address, "lend", lend_bytes=1 * MiB) as c:
        c.put([b"warm"], [make_page(1)])
        session = c._shm.session
        assert session is not None
        wire = wire_pages([b"z"], [make_page(4)])
        stub = pb_grpc.CacheServiceStub(c._channel)
        req = put_request("lend", wire, session.id, [session.segment.request_end], 0,
                          (session.segment.size, 16))  # ring outside the segment
        with pytest.raises(grpc.RpcError) as info:
            stub.Put(req)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "shm_ring_offset" in (info.value.details() or "")


def test_the_return_ring_wraps_over_many_laps(daemon: Daemon,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A ring of 4 slots: the client lends at most four ranges at a time (more would not fit
    the ring), and every range comes back once, over many laps."""
    from kvtier_client import shm as shm_client

    monkeypatch.setattr(shm_client, "RING_SLOTS", 4)
    with KVTierClient(daemon.grpc_address, "ring", lend_bytes=256 << 10) as c:
        page = make_page(5)  # 16 KiB
        lo = hi = 0
        for lap in range(10):
            keys = [b"l%d-%d" % (lap, i) for i in range(4)]
            for i in range(0, 4, 2):
                assert c.put(keys[i:i + 2], [page] * 2) == ["stored"] * 2
            if lap == 0:
                lo, hi = _daemon_range(daemon, c)
            raws = daemon.context.store.get_raw("ring", keys)
            assert [r is not None and lo <= _addr(r.k) < hi for r in raws] == [True] * 4
            del raws
            assert c.put([b"x%d" % lap], [page]) == ["stored"]  # a fifth would not fit the ring
            raw = daemon.context.store.get_raw("ring", [b"x%d" % lap])[0]
            assert raw is not None and not lo <= _addr(raw.k) < hi
            del raw
            c.delete(keys + [b"x%d" % lap])
            assert daemon.relocator is not None
            assert wait_for(daemon.relocator.idle)
        session = c._shm.session
        assert session is not None and session.segment.lend is not None
        session.segment.take_back()
        assert session.segment.lend.used_bytes == 0
        assert c.put([b"last"], [page]) == ["stored"]
        got = c.get([b"last"])[0]
        assert got is not None and np.array_equal(got.k, page.k)


def test_ranges_the_ring_has_no_room_for_wait_and_bound_further_lending() -> None:
    import mmap
    import struct
    import threading

    from kvtier.errors import CapacityExhausted
    from kvtier.transport.shm.lend import ReturnRing
    from kvtier_client.shm_layout import RING_HEAD_OFFSET, RING_TAIL_OFFSET

    mm = mmap.mmap(-1, 1 << 16)
    ring = ReturnRing(mm, 4096, 2, threading.Event())
    arrays = [ring.lend(8192 + 64 * i, 64) for i in range(2)]
    ring.check_lend([])
    with pytest.raises(CapacityExhausted, match="return ring of 2 slots"):
        ring.check_lend([(9000, 64)])
    del arrays  # both come back; the ring is full now (the client took nothing back)
    assert struct.unpack_from("<Q", mm, RING_HEAD_OFFSET)[0] == 2
    arrays = [ring.lend(8192 + 64 * i, 64) for i in range(2)]
    del arrays  # these wait in the daemon
    assert struct.unpack_from("<Q", mm, RING_HEAD_OFFSET)[0] == 2 and ring.outstanding() == 2
    with pytest.raises(CapacityExhausted):
        ring.check_lend([(9000, 64)])
    assert not ring.hand_back([8192])
    struct.pack_into("<Q", mm, RING_TAIL_OFFSET, 2)  # the client takes the first two back
    ring.flush()
    assert struct.unpack_from("<Q", mm, RING_HEAD_OFFSET)[0] == 4 and ring.outstanding() == 0


async def test_the_async_client_lends_too(daemon: Daemon) -> None:
    from kvtier_client import AsyncKVTierClient, InvalidArgumentError

    store = daemon.context.store
    async with AsyncKVTierClient(daemon.grpc_address, "lend-aio", lend_bytes=1 * MiB) as a:
        pages = [make_page(i) for i in range(2)]
        assert await a.put([b"a", b"b"], pages) == ["stored"] * 2
        session = a._shm.session
        assert session is not None
        mm = daemon._shm.get(session.id)._mm
        lo = int(np.frombuffer(mm, np.uint8, 1).ctypes.data)
        raw = store.get_raw("lend-aio", [b"a"])[0]
        assert raw is not None and lo <= _addr(raw.k) < lo + len(mm)
        del raw
        got = await a.get([b"a", b"b"])
        assert all(g is not None and np.array_equal(g.v, p.v) for g, p in zip(got, pages))
        bad = make_page(3)
        bad.v[0, 0, 0, 0] = np.inf
        with pytest.raises(InvalidArgumentError, match="v holds"):
            await a.put([b"bad"], [bad])
        assert a._shm.session is session  # the ranges come back: the segment is kept


def test_a_finalizer_never_waits_for_the_ring() -> None:
    """give_back runs as a finalizer, possibly inside a flush of the same ring (the GC runs at
    any allocation): it must not wait for the lock; what it leaves goes out with the next
    flush."""
    import mmap
    import struct
    import threading

    from kvtier.transport.shm.lend import ReturnRing
    from kvtier_client.shm_layout import RING_HEAD_OFFSET

    mm = mmap.mmap(-1, 1 << 16)
    ring = ReturnRing(mm, 4096, 8, threading.Event())
    ring._lock.acquire()  # a flush in progress on this thread
    ring.give_back(640)  # returns at once
    assert struct.unpack_from("<Q", mm, RING_HEAD_OFFSET)[0] == 0
    ring._lock.release()
    ring.flush()
    assert struct.unpack_from("<Q", mm, RING_HEAD_OFFSET)[0] == 1
    assert struct.unpack_from("<Q", mm, 4096)[0] == 640


def test_a_failed_lend_put_keeps_its_segment_and_every_range_comes_back(
        daemon: Daemon) -> None:
    """Failing after its ranges were lent (NaN) or before (a bad header): either way the daemon
    promises the ranges back (RANGES_BACK), so the client keeps its segment."""
    from kvtier_client import InvalidArgumentError

    with pytest.raises(ValueError, match="lend_bytes"):
        KVTierClient(daemon.grpc_address, "lend", shm_bytes=1 << 20, lend_bytes=1 << 20)
    with KVTierClient(daemon.grpc_address, "lend", lend_bytes=1 * MiB) as c:
        bad = make_page(6)
        bad.k[0, 0, 0, 0] = np.nan
        c.put([b"ok"], [make_page(7)])
        first = c._shm.session
        assert first is not None and first.segment.lend is not None
        segment, lend = first.segment, first.segment.lend
        held = lend.used_bytes
        with pytest.raises(InvalidArgumentError, match="k holds NaN"):
            c.put([b"bad"], [bad])  # checked after lending
        with pytest.raises(InvalidArgumentError, match="start_position"):
            c.put([b"b1", b"b2"], [make_page(9), make_page(10, start_position=-1)])
        assert c._shm.session is first
        assert wait_for(lambda: (segment.take_back(), lend.used_bytes)[1] == held)
        assert c.put([b"next"], [make_page(8)]) == ["stored"]
        assert c._shm.session is first
        assert [g is not None for g in c.get([b"ok", b"next", b"bad", b"b1"])] == \
            [True, True, False, False]


def test_without_a_usable_ring_nothing_is_promised_and_lending_is_bounded(
        daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lending put naming a session of another namespace gets no RANGES_BACK; a client
    that never takes ranges back can hold at most a ring's worth in the daemon."""
    import grpc

    from kvtier_client import shm as shm_client
    from kvtier_client.core import put_request, wire_pages
    from kvtier_proto.v1 import cache_pb2_grpc as pb_grpc

    monkeypatch.setattr(shm_client, "RING_SLOTS", 4)
    with KVTierClient(daemon.grpc_address, "lend", lend_bytes=1 * MiB) as c:
        c.put([b"warm"], [make_page(1)])
        session = c._shm.session
        assert session is not None
        seg = session.segment
        ring = (seg.ring_offset, seg.ring_slots)
        stub = pb_grpc.CacheServiceStub(c._channel)
        wire = wire_pages([b"x"], [make_page(2)])
        with pytest.raises(grpc.RpcError) as info:
            stub.Put(put_request("other-ns", wire, session.id, [seg.request_end], 0, ring))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert not any(k == shm_client.RANGES_BACK for k, _ in info.value.trailing_metadata())
        with pytest.raises(grpc.RpcError) as info:  # "warm" lies there, still kept
            stub.Put(put_request("lend", wire, session.id, [seg.request_end], 0, ring))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "overlaps another lent range" in (info.value.details() or "")
        assert not any(k == shm_client.RANGES_BACK for k, _ in info.value.trailing_metadata())
        codes = []
        for i in range(6):  # ranges lent raw, never taken back; "warm" holds one slot
            off = seg.request_end + (i + 1) * 32768
            try:
                stub.Put(put_request("lend", wire_pages([b"r%d" % i], [make_page(3)]),
                                     session.id, [off], 0, ring))
                codes.append("OK")
            except grpc.RpcError as e:
                codes.append(e.code().name)
        assert codes == ["OK"] * 3 + ["RESOURCE_EXHAUSTED"] * 3


def test_ended_sessions_holding_lent_pages_count_against_the_limit() -> None:
    """A client can end its session while the daemon still keeps pages it lent: that segment
    stays mapped, so it counts against the session limit until the pages are gone."""
    import gc

    from kvtier.errors import CapacityExhausted
    from kvtier.transport.shm.session import ShmRegistry
    from kvtier_client.shm import Segment

    reg = ShmRegistry(max_sessions=2)
    segs = [Segment(1 << 20) for _ in range(3)]
    try:
        a = reg.attach("t", segs[0].path, segs[0].size, segs[0].token)
        page = a.ring(1 << 19, 16).lend(4096, 64)  # a lent page the store still keeps
        reg.detach(a.session_id)
        reg.attach("t", segs[1].path, segs[1].size, segs[1].token)
        with pytest.raises(CapacityExhausted, match="1 ended ones still holding lent pages"):
            reg.attach("t", segs[2].path, segs[2].size, segs[2].token)
        del page
        gc.collect()
        reg.attach("t", segs[2].path, segs[2].size, segs[2].token)  # unmapped: room again
    finally:
        reg.close_all()
        for s in segs:
            s.close()


def _big_pages(count: int, seed: int) -> list[Page]:
    rng = np.random.default_rng(seed)  # 512 KiB each: past the overlap threshold
    return [Page(rng.standard_normal((4, 128, 4, 64)).astype(np.float16),
                 rng.standard_normal((4, 128, 4, 64)).astype(np.float16))
            for _ in range(count)]


def _spy_fills(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The fill numbers of the puts whose bytes the client copied while the call was out."""
    import kvtier_client.core as core
    import kvtier_client.shm as shm_client

    if not shm_client.OVERLAP_SAFE:
        pytest.skip("overlapped puts are x86-64 only")
    fills: list[int] = []
    real = core.fill_segment

    def spy(segment: object, plan: object, fill: int, *args: object) -> None:
        fills.append(fill)
        real(segment, plan, fill, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(core, "fill_segment", spy)  # what the copier and the asyncio client run
    return fills


def test_large_lending_puts_copy_while_the_call_is_in_flight(
        daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    """By default a lending put of >= 256 KiB starts its call first and the daemon checks each
    part where it lies as the client writes it; the page is kept there, whole. A NaN in the
    last part is still refused, the segment kept, and the range comes back."""
    from kvtier_client import InvalidArgumentError

    fills = _spy_fills(monkeypatch)
    store = daemon.context.store
    big = _big_pages(3, seed=11)
    with KVTierClient(daemon.grpc_address, "lend", lend_bytes=8 * MiB) as c:
        assert c.put([b"b0"], [big[0]]) == ["stored"]
        assert c.put([b"b1", b"b2"], [big[1], big[2]]) == ["stored"] * 2
        c.put([b"small"], [make_page(1)])  # 16 KiB: copied before the call
        assert fills == [1, 2]
        session = c._shm.session
        assert session is not None and session.segment.lend is not None
        lend = session.segment.lend
        lo, hi = _daemon_range(daemon, c)
        for key, page in zip((b"b0", b"b1", b"b2"), big):
            raw = store.get_raw("lend", [key])[0]
            assert raw is not None and lo <= _addr(raw.k) < hi  # lent, not copied
            del raw
            got = c.get([key])[0]
            assert got is not None and np.array_equal(got.k, page.k) \
                and np.array_equal(got.v, page.v)
        held = lend.used_bytes
        bad = Page(big[0].k.copy(), big[0].v.copy())
        bad.v[3, 127, 3, 63] = np.nan  # in the last piece the client writes
        with pytest.raises(InvalidArgumentError, match="v holds NaN or Inf"):
            c.put([b"bad"], [bad])
        assert fills == [1, 2, 4] and c._shm.session is session
        assert store.page_info("lend", b"bad") is None
        assert wait_for(lambda: (session.segment.take_back(), lend.used_bytes)[1] == held)
        assert c.put([b"after"], [big[2]]) == ["stored"] and c._shm.session is session
    with KVTierClient(daemon.grpc_address, "lend-b", lend_bytes=8 * MiB,
                      overlap_copy=False) as plain:  # copied before the call, still lent
        assert plain.put([b"b0"], [big[0]]) == ["stored"]
        got = plain.get([b"b0"])[0]
        assert got is not None and np.array_equal(got.v, big[0].v)
    assert fills == [1, 2, 4, 6]  # the failed "bad" (4) voided 5


async def test_large_async_lending_puts_copy_while_the_call_is_in_flight(
        daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvtier_client import AsyncKVTierClient

    fills = _spy_fills(monkeypatch)
    big = _big_pages(2, seed=12)
    async with AsyncKVTierClient(daemon.grpc_address, "lend-aio", lend_bytes=4 * MiB) as a:
        assert await a.put([b"b0", b"b1"], big) == ["stored"] * 2
        assert fills == [1]
        got = await a.get([b"b0", b"b1"])
        assert all(g is not None and np.array_equal(g.k, p.k) and np.array_equal(g.v, p.v)
                   for g, p in zip(got, big))


def test_a_client_stalled_mid_fill_gets_its_put_stored_within_its_deadline(
        daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon waits for an overlapped put's bytes as long as the call's deadline, not a
    fixed while: a client paused mid-copy (its GIL held elsewhere, a full GC) is late, not
    refused."""
    import time

    import kvtier.transport.cache.servicer as servicer_mod
    import kvtier_client.core as core

    fills = _spy_fills(monkeypatch)
    spy = core.fill_segment

    def stalled(*args: object) -> None:
        time.sleep(0.5)
        spy(*args)

    monkeypatch.setattr(core, "fill_segment", stalled)
    monkeypatch.setattr(servicer_mod, "FILL_TIMEOUT_S", 0.2)  # only for calls without one
    big = _big_pages(1, seed=13)[0]
    with KVTierClient(daemon.grpc_address, "lend", lend_bytes=8 * MiB) as c:
        assert c.put([b"late"], [big], timeout_s=10) == ["stored"] and fills == [1]
        got = c.get([b"late"])[0]
        assert got is not None and np.array_equal(got.v, big.v)


def test_without_a_copier_thread_an_overlapped_put_copies_first(
        daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where no thread can be started (a thread limit), the put copies before its call
    instead of failing, and the next put tries for the copier again."""
    import threading

    fills = _spy_fills(monkeypatch)
    real_start = threading.Thread.start
    refused: list[str] = []

    def start(self: threading.Thread) -> None:
        if self.name == "kvtier-shm-fill" and not refused:
            refused.append(self.name)
            raise RuntimeError("can't start new thread")
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    big = _big_pages(2, seed=14)
    with KVTierClient(daemon.grpc_address, "lend", lend_bytes=8 * MiB) as c:
        assert c.put([b"a"], [big[0]], timeout_s=5) == ["stored"] and refused
        assert c.put([b"b"], [big[1]], timeout_s=5) == ["stored"]
        assert fills == [1, 2]
        assert any(t.name == "kvtier-shm-fill" for t in threading.enumerate())
        got = c.get([b"a", b"b"])
        assert all(g is not None and np.array_equal(g.k, p.k) and np.array_equal(g.v, p.v)
                   for g, p in zip(got, big))
