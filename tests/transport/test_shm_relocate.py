"""Lent pages copied out of their client's segment: when its lend area is full, and when its
session ends. The pages stay (same bytes), their ranges come back, and the segment is let go."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from kvtier.daemon import Daemon
from kvtier_client import KVTierClient

from .conftest import DaemonFactory, make_page, wait_for

PAGE = 16 << 10  # make_page: 16 KiB


def _in_segment(daemon: Daemon, c: KVTierClient, keys: list[bytes]) -> list[bool]:
    """Whether each stored page's bytes lie in the client's segment (lent, not copied)."""
    session = c._shm.session
    assert session is not None
    lo = daemon._shm.get(session.id).base
    hi = lo + session.segment.size
    raws = daemon.context.store.get_raw(c.namespace, keys)
    return [r is not None and lo <= int(np.frombuffer(r.k, np.uint8).ctypes.data) < hi
            for r in raws]


def test_a_full_lend_area_is_copied_out_and_lends_again(daemon: Daemon) -> None:
    relocator = daemon.relocator
    assert relocator is not None
    with KVTierClient(daemon.grpc_address, "full", lend_bytes=4 * PAGE) as c:
        pages = [make_page(i) for i in range(7)]
        keys = [b"p%d" % i for i in range(7)]
        for key, page in zip(keys[:4], pages):
            assert c.put([key], [page]) == ["stored"]
        assert _in_segment(daemon, c, keys[:4]) == [True] * 4
        assert c.put([keys[4]], [pages[4]]) == ["stored"]  # no room: copied, asks to reclaim
        assert wait_for(lambda: relocator.jobs_done >= 1 and relocator.idle())
        assert relocator.pages_moved == 4
        assert _in_segment(daemon, c, keys[:5]) == [False] * 5
        for key, page in zip(keys[5:], pages[5:]):  # the ranges came back: lending again
            assert c.put([key], [page]) == ["stored"]
        assert _in_segment(daemon, c, keys[5:]) == [True, True]
        got = c.get(keys)
        for g, page in zip(got, pages):
            assert g is not None and np.array_equal(g.k, page.k) and np.array_equal(g.v, page.v)


def test_pages_lent_by_an_ended_session_stay_and_the_segment_is_let_go(
        daemon: Daemon) -> None:
    relocator = daemon.relocator
    assert relocator is not None
    pages = [make_page(i) for i in range(3)]
    keys = [b"e%d" % i for i in range(3)]
    with KVTierClient(daemon.grpc_address, "ended", lend_bytes=8 * PAGE) as c:
        assert c.put(keys, pages) == ["stored"] * 3
        assert _in_segment(daemon, c, keys) == [True] * 3
    assert wait_for(lambda: relocator.pages_moved == 3 and relocator.idle())
    assert daemon._shm._retired  # ended, kept mapped while its pages are lent
    assert wait_for(lambda: all(s._mm.closed for s in daemon._shm._retired))  # by the job
    with KVTierClient(daemon.grpc_address, "ended", shared_memory=False) as other:
        got = other.get(keys)
    for g, page in zip(got, pages):
        assert g is not None and g.tier == "hot"
        assert np.array_equal(g.k, page.k) and np.array_equal(g.v, page.v)


def test_a_lent_page_its_client_made_non_finite_is_dropped_when_copied_out(
        daemon: Daemon) -> None:
    relocator = daemon.relocator
    assert relocator is not None
    with KVTierClient(daemon.grpc_address, "tamper", lend_bytes=8 * PAGE) as c:
        assert c.put([b"good", b"bad"], [make_page(1), make_page(2)]) == ["stored"] * 2
        session = c._shm.session
        assert session is not None
        raw = daemon.context.store.get_raw("tamper", [b"bad"])[0]
        assert raw is not None
        np.frombuffer(raw.k, np.float16).copy()  # still finite here
        off = int(np.frombuffer(raw.k, np.uint8).ctypes.data) - daemon._shm.get(session.id).base
        del raw
        session.segment.array(off, 2)[:] = np.array([np.inf], np.float16).view(np.uint8)
    assert wait_for(lambda: relocator.jobs_done >= 1 and relocator.idle())
    with KVTierClient(daemon.grpc_address, "tamper", shared_memory=False) as other:
        good, bad = other.get([b"good", b"bad"])
    assert good is not None and bad is None


def test_gets_during_copy_out_always_see_whole_pages(daemon: Daemon) -> None:
    relocator = daemon.relocator
    assert relocator is not None
    pages = [make_page(i) for i in range(16)]
    keys = [b"c%d" % i for i in range(16)]
    errors: list[str] = []
    stop = threading.Event()
    with KVTierClient(daemon.grpc_address, "conc", lend_bytes=16 * PAGE) as c:
        assert c.put(keys, pages) == ["stored"] * 16

        def reader() -> None:
            with KVTierClient(daemon.grpc_address, "conc", shared_memory=False) as r:
                while not stop.is_set():
                    for g, page in zip(r.get(keys), pages):
                        if g is None or not (np.array_equal(g.k, page.k)
                                             and np.array_equal(g.v, page.v)):
                            errors.append("a page changed or vanished")

        t = threading.Thread(target=reader)
        t.start()
        try:
            for _ in range(5):
                session = c._shm.session
                assert session is not None
                relocator.relocate(daemon._shm.get(session.id))
        finally:
            stop.set()
            t.join()
        assert _in_segment(daemon, c, keys) == [False] * 16
    assert errors == []


def test_a_page_mid_move_is_left_to_the_move_and_copied_out_after(
        make_daemon: DaemonFactory) -> None:
    """A move holds its own reference to the lent page and commits it: copying out must wait
    until the page is resident again (here in a second uncompressed tier)."""
    import time

    from kvtier.config import MiB, TierConfig
    from kvtier.store import transfer
    from kvtier.types import Codec, Medium, PageId

    tiers = [TierConfig(name="hot", medium=Medium.DEVICE, codec=Codec.NONE, capacity_bytes=MiB),
             TierConfig(name="warm", medium=Medium.HOST, codec=Codec.NONE, capacity_bytes=MiB)]
    d = make_daemon(tiers=tiers, mover_interval_s=10.0)
    assert d.relocator is not None
    engine = d.context.store._engine
    page = make_page(3)
    with KVTierClient(d.grpc_address, "mv", lend_bytes=8 * PAGE) as c:
        assert c.put([b"p"], [page]) == ["stored"]
        session = d._shm.get(c._shm.session.id)  # type: ignore[union-attr]
        real = engine.converter.to_tier

        def slow(*args: object) -> object:
            time.sleep(0.3)  # between the move's begin and its commit
            return real(*args)  # type: ignore[arg-type]

        engine.converter.to_tier = slow  # type: ignore[method-assign]
        mover = threading.Thread(target=lambda: transfer.move(engine, PageId("mv", b"p"), 1))
        mover.start()
        time.sleep(0.1)
        assert d.relocator.relocate(session) == 0  # mid-move: left alone
        mover.join()
        engine.converter.to_tier = real  # type: ignore[method-assign]
        assert _in_segment(d, c, [b"p"]) == [True]  # the move committed the lent page
        assert d.relocator.relocate(session) == 1
        assert _in_segment(d, c, [b"p"]) == [False]
        got = c.get([b"p"])[0]
        assert got is not None and got.tier == "warm" and np.array_equal(got.v, page.v)


def test_overlapped_puts_ask_for_copy_out_too(daemon: Daemon) -> None:
    relocator = daemon.relocator
    assert relocator is not None
    big = [make_page(i, shape=(4, 128, 8, 128)) for i in range(3)]  # 2 MiB each
    with KVTierClient(daemon.grpc_address, "ovl", overlap_copy=True, lend_bytes=4 << 20) as c:
        for i, page in enumerate(big):  # two fit the lend area; the third is overlapped
            assert c.put([b"o%d" % i], [page]) == ["stored"]
        assert wait_for(lambda: relocator.pages_moved >= 2 and relocator.idle())
        assert _in_segment(daemon, c, [b"o0", b"o1", b"o2"]) == [False] * 3


async def test_a_cancelled_lending_put_makes_the_async_client_start_a_new_segment(
        daemon: Daemon) -> None:
    import asyncio

    from kvtier_client import AsyncKVTierClient

    async with AsyncKVTierClient(daemon.grpc_address, "cancel", lend_bytes=8 * PAGE) as a:
        assert await a.put([b"first"], [make_page(1)]) == ["stored"]
        first = a._shm.session
        task = asyncio.ensure_future(a.put([b"second"], [make_page(2)]))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert a._shm.session is not first  # the ranges it lent may never come back
        assert await a.put([b"third"], [make_page(3)]) == ["stored"]
