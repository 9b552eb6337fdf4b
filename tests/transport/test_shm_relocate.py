"""Lent pages copied out of their client's segment: when its lend area is full, and when its
session ends. The pages stay (same bytes), their ranges come back, and the segment is let go."""

from __future__ import annotations

import threading

import numpy as np

from kvtier.daemon import Daemon
from kvtier_client import KVTierClient

from .conftest import make_page, wait_for

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
    assert wait_for(lambda: not [s for s in daemon._shm._retired if not s.unmap()])
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
                        if g is None or not np.array_equal(g.k, page.k):
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
