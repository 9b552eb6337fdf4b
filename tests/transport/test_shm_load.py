"""Many clients at once, more than the daemon's shared-memory sessions, over every put path:
lending (overlapped for large pages), copied, staged and inline. Each reads back exactly its
own pages, and nothing is left attached afterwards."""

from __future__ import annotations

import threading

import numpy as np

from kvtier.daemon import Daemon
from kvtier_client import KVTierClient, Page

from .conftest import wait_for

CLIENTS = 40  # the daemon attaches 32 sessions; the rest go inline
SMALL, LARGE = (2, 16, 2, 64), (4, 128, 4, 64)  # 16 KiB and 512 KiB pages (k + v)


def _work(address: str, i: int, together: threading.Barrier, shm_users: list[bool],
          errors: list[str]) -> None:
    rng = np.random.default_rng(i)
    kw = {"lend_bytes": 4 << 20} if i % 3 == 0 else {"lend_bytes": 0} if i % 3 == 1 else {}
    try:
        with KVTierClient(address, f"tenant-{i}", shm_bytes=16 << 20, staging_bytes=2 << 20,
                          timeout_s=60, **kw) as c:
            kept: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}
            for n in range(10):
                shape = LARGE if n % 2 else SMALL
                if n % 5 == 4:  # a staged page: written in place, no client copy
                    page = c.staged_page(shape)
                    page.k[...] = rng.standard_normal(shape)
                    page.v[...] = rng.standard_normal(shape)
                else:
                    page = Page(rng.standard_normal(shape).astype(np.float16),
                                rng.standard_normal(shape).astype(np.float16))
                key = b"p%d" % n
                assert c.put([key], [page]) == ["stored"]
                if n == 0:  # every client has asked for its session by now
                    together.wait(60)
                kept[key] = (np.array(page.k), np.array(page.v))
                if n % 5 == 4:
                    c.release_page(page)
                if n % 3 == 2:  # some go again
                    c.delete([key])
                    del kept[key]
            got = c.get(list(kept))
            for (key, (k, v)), g in zip(kept.items(), got):
                if g is None or not (np.array_equal(g.k, k) and np.array_equal(g.v, v)):
                    errors.append(f"tenant-{i} {key!r}: wrong or missing page")
            shm_users.append(c.uses_shared_memory)
    except Exception as e:  # noqa: BLE001 - reported by the test
        errors.append(f"tenant-{i}: {e!r}")


def test_forty_clients_beyond_the_session_limit_each_read_back_their_own_pages(
        daemon: Daemon) -> None:
    shm_users: list[bool] = []
    errors: list[str] = []
    together = threading.Barrier(CLIENTS)
    threads = [threading.Thread(target=_work,
                                args=(daemon.grpc_address, i, together, shm_users, errors))
               for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert len(shm_users) == CLIENTS and sum(shm_users) == 32  # the rest went inline
    assert wait_for(lambda: len(daemon._shm) == 0)  # every session ended with its client
    store = daemon.context.store
    assert store.lookup("tenant-7", [b"p0", b"p1"]).prefix_length == 2
    assert store.lookup("tenant-7", [b"p2"]).prefix_length == 0  # deleted
