"""Load through daemons for the fault tests: readers and writers on threads, every call timed
against a deadline and every page read checked against what was put."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from kvtier_client import KVTierClient, Page

SHAPE = (2, 16, 2, 64)  # float16: 16 KiB a page


def kv(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(SHAPE).astype(np.float16),
            rng.standard_normal(SHAPE).astype(np.float16))


def close_enough(got: Any, want: np.ndarray) -> bool:
    """Within the int4 bound of the page's range (the shared tier's codec here)."""
    w = want.astype(np.float32)
    span = float(w.max() - w.min())
    return bool(np.abs(got.astype(np.float32) - w).max() <= span / 15 * 0.51 + 1e-2)


class Load:
    """Threads calling daemons until :meth:`stop`; what they saw is in the attributes."""

    def __init__(self, deadline_s: float) -> None:
        self.deadline_s = deadline_s
        self.latencies: list[float] = []
        self.misses: list[int] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def reader(self, address: str, ns: str, seeds: dict[bytes, int], rng_seed: int) -> None:
        """Gets of 8 random keys of ``seeds`` (key -> seed of the page put under it)."""
        self._spawn(self._read, address, ns, seeds, rng_seed)

    def writer(self, address: str, ns: str, first_seed: int) -> None:
        """Puts of new pages, one a call."""
        self._spawn(self._write, address, ns, first_seed)

    def _spawn(self, target: Any, *args: Any) -> None:
        t = threading.Thread(target=target, args=args)
        self._threads.append(t)
        t.start()

    def _read(self, address: str, ns: str, seeds: dict[bytes, int], rng_seed: int) -> None:
        rng = np.random.default_rng(rng_seed)
        keys = list(seeds)
        with KVTierClient(address, ns, timeout_s=self.deadline_s) as c:
            while not self._stop.is_set():
                batch = [keys[int(i)] for i in rng.choice(len(keys), 8, replace=False)]
                t0 = time.monotonic()
                try:
                    got = c.get(batch)
                except Exception as e:  # noqa: BLE001 - any error fails the test
                    self.errors.append(e)
                    return
                self.latencies.append(time.monotonic() - t0)
                self.misses.append(sum(g is None for g in got))
                for k, g in zip(batch, got, strict=True):
                    want = kv(seeds[k])
                    if g is not None and not (close_enough(g.k, want[0])
                                              and close_enough(g.v, want[1])):
                        self.errors.append(AssertionError(f"wrong data for {k!r} ({g.tier})"))

    def _write(self, address: str, ns: str, first_seed: int) -> None:
        i = 0
        with KVTierClient(address, ns, timeout_s=self.deadline_s) as c:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    c.put([b"new-%d" % i], [Page(*kv(first_seed + i), start_position=64)])
                except Exception as e:  # noqa: BLE001
                    self.errors.append(e)
                    return
                self.latencies.append(time.monotonic() - t0)
                i += 1

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def check(self) -> None:
        """No call failed, none took the deadline, no page read was wrong."""
        assert not self.errors, self.errors[:3]
        assert self.latencies and max(self.latencies) < self.deadline_s, max(self.latencies)
