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
        keys = [b"k%d" % i for i in range(6)]
        for key in keys:
            assert c.put([key], [page]) == ["stored"]
        lo, hi = _daemon_range(daemon, c)
        inside = [lo <= _addr(r.k) < hi for r in store.get_raw("lend", keys) if r is not None]
        assert inside == [True] * 4 + [False] * 2
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

    from kvtier_client.wire import put_request, wire_pages
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


def test_the_return_ring_wraps_and_holds_what_does_not_fit(daemon: Daemon,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A ring of 4 slots: ranges handed back while the client has not taken the earlier ones
    wait in the daemon; every range comes back once, over many laps."""
    from kvtier_client import shm as shm_client

    monkeypatch.setattr(shm_client, "RING_SLOTS", 4)
    with KVTierClient(daemon.grpc_address, "ring", lend_bytes=256 << 10) as c:
        page = make_page(5)  # 16 KiB
        for lap in range(10):
            keys = [b"l%d-%d" % (lap, i) for i in range(6)]
            assert c.put(keys, [page] * 6) == ["stored"] * 6
            c.delete(keys)  # six ranges handed back into a ring of four
        session = c._shm.session
        assert session is not None and session.segment.lend is not None
        segment, lend = session.segment, session.segment.lend
        assert lend.used_bytes > 0  # a backlog: more came back than the ring holds
        for i in range(40):  # each call lets the daemon append what the ring has room for
            segment.take_back()
            if lend.used_bytes == 0:
                break
            assert c.get([b"nothing-%d" % i]) == [None]
        assert lend.used_bytes == 0
        assert c.put([b"last"], [page]) == ["stored"]
        got = c.get([b"last"])[0]
        assert got is not None and np.array_equal(got.k, page.k)


async def test_the_async_client_lends_too(daemon: Daemon) -> None:
    from kvtier_client import AsyncKVTierClient

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


def test_a_finalizer_never_waits_for_the_ring() -> None:
    """give_back runs as a finalizer, possibly inside a flush of the same ring (the GC runs at
    any allocation): it must not wait for the lock; what it leaves goes out with the next
    flush."""
    import mmap
    import struct
    import threading

    from kvtier.transport.shm_lend import HEAD_OFFSET, ReturnRing

    mm = mmap.mmap(-1, 1 << 16)
    ring = ReturnRing(mm, 4096, 8, threading.Event())
    ring._lock.acquire()  # a flush in progress on this thread
    ring.give_back(640)  # returns at once
    assert struct.unpack_from("<Q", mm, HEAD_OFFSET)[0] == 0
    ring._lock.release()
    ring.flush()
    assert struct.unpack_from("<Q", mm, HEAD_OFFSET)[0] == 1
    assert struct.unpack_from("<Q", mm, 4096)[0] == 640


def test_a_failed_lend_put_starts_a_new_segment_and_bad_sizes_fail_early(
        daemon: Daemon) -> None:
    from kvtier_client import InvalidArgumentError

    with pytest.raises(ValueError, match="lend_bytes"):
        KVTierClient(daemon.grpc_address, "lend", shm_bytes=1 << 20, lend_bytes=1 << 20)
    with KVTierClient(daemon.grpc_address, "lend", lend_bytes=1 * MiB) as c:
        bad = make_page(6)
        bad.k[0, 0, 0, 0] = np.nan
        c.put([b"ok"], [make_page(7)])
        first = c._shm.session
        with pytest.raises(InvalidArgumentError, match="k holds NaN"):
            c.put([b"bad"], [bad])
        assert c.put([b"next"], [make_page(8)]) == ["stored"]
        assert c._shm.session is not None and c._shm.session is not first
        assert all(g is not None for g in c.get([b"ok", b"next"]))


def test_ended_sessions_holding_lent_pages_count_against_the_limit() -> None:
    """A client can end its session while the daemon still keeps pages it lent: that segment
    stays mapped, so it counts against the session limit until the pages are gone."""
    import gc

    from kvtier.errors import CapacityExhausted
    from kvtier.transport.shm import ShmRegistry
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
