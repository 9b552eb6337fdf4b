"""Graceful stop: no new calls, in-flight calls finish within the grace period, sessions end."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from kvtier.transport.context import Readiness
from kvtier_client import KVTierClient, UnavailableError

from .conftest import DaemonFactory, make_page


def test_stop_finishes_in_flight_calls_and_refuses_new_ones(make_daemon: DaemonFactory,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            ) -> None:
    d = make_daemon()
    store = d.context.store
    real_put = store.put_checked
    entered = threading.Event()

    def slow_put(*args: Any, **kw: Any) -> Any:  # a put still running when stop() begins
        entered.set()
        time.sleep(1.0)
        return real_put(*args, **kw)

    monkeypatch.setattr(store, "put_checked", slow_put)
    c = KVTierClient(d.grpc_address, "stop", timeout_s=10)
    c.get([b"warm-up"])  # attaches the shm session too
    assert c.uses_shared_memory
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(c.put([b"late"], [make_page(1)])))
    t.start()
    assert entered.wait(5)
    t0 = time.monotonic()
    d.stop(grace_s=5.0)
    stopped_in = time.monotonic() - t0
    t.join(5)
    assert result == [["stored"]]  # the in-flight call completed
    assert stopped_in < 4.0  # waited for it, not for the whole grace period
    assert d.context.health.state is Readiness.STOPPED
    assert len(d._shm) == 0
    with pytest.raises(UnavailableError):
        c.lookup([b"late"], timeout_s=1)
    c.close()
