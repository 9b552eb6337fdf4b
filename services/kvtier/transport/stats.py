"""Per-method RPC statistics kept by the transport, with observers for metrics exporters.

The interceptor calls :meth:`RpcStats.record` once per finished call. Totals are kept here so
the daemon can answer ``Stats`` and health pages without any metrics library; exporters (the
Prometheus histogram of the admin layer) subscribe with :meth:`RpcStats.add_observer` and get
every :class:`RpcSample`. Observers run on the gRPC worker thread right after the call, so they
must be cheap and must not raise (a raising observer is logged and skipped, never fails a call).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RpcSample:
    """One finished call. ``code`` is a gRPC status code name (``OK``, ``INVALID_ARGUMENT``...)."""

    method: str
    code: str
    seconds: float
    bytes_in: int
    bytes_out: int


@dataclass(frozen=True, slots=True)
class MethodTotals:
    """Accumulated figures of one (method, code) pair."""

    calls: int
    seconds: float
    bytes_in: int
    bytes_out: int


RpcObserver = Callable[[RpcSample], None]


class RpcStats:
    """Thread-safe totals per (method, code) and an observer list."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # [calls, seconds, bytes_in, bytes_out], mutated in place: a call records in ~1 us
        self._totals: dict[tuple[str, str], list[float]] = {}
        self._observers: tuple[RpcObserver, ...] = ()  # replaced, never mutated

    def add_observer(self, observer: RpcObserver) -> None:
        with self._lock:
            self._observers = (*self._observers, observer)

    def remove_observer(self, observer: RpcObserver) -> None:
        with self._lock:
            observers = list(self._observers)
            observers.remove(observer)
            self._observers = tuple(observers)

    def record(self, sample: RpcSample) -> None:
        key = (sample.method, sample.code)
        with self._lock:
            t = self._totals.get(key)
            if t is None:
                t = self._totals[key] = [0, 0.0, 0, 0]
            t[0] += 1
            t[1] += sample.seconds
            t[2] += sample.bytes_in
            t[3] += sample.bytes_out
        for obs in self._observers:
            try:
                obs(sample)
            except Exception:
                log.exception("rpc stats observer %r failed; ignored", obs)

    def totals(self) -> Mapping[tuple[str, str], MethodTotals]:
        """A snapshot: ``{(method, code): MethodTotals}``."""
        with self._lock:
            return {k: MethodTotals(int(t[0]), t[1], int(t[2]), int(t[3]))
                    for k, t in self._totals.items()}
