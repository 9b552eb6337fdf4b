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
        self._totals: dict[tuple[str, str], MethodTotals] = {}
        self._observers: list[RpcObserver] = []

    def add_observer(self, observer: RpcObserver) -> None:
        with self._lock:
            self._observers.append(observer)

    def remove_observer(self, observer: RpcObserver) -> None:
        with self._lock:
            self._observers.remove(observer)

    def record(self, sample: RpcSample) -> None:
        with self._lock:
            key = (sample.method, sample.code)
            t = self._totals.get(key)
            self._totals[key] = MethodTotals(
                calls=(t.calls if t else 0) + 1,
                seconds=(t.seconds if t else 0.0) + sample.seconds,
                bytes_in=(t.bytes_in if t else 0) + sample.bytes_in,
                bytes_out=(t.bytes_out if t else 0) + sample.bytes_out,
            )
            observers = tuple(self._observers)
        for obs in observers:
            try:
                obs(sample)
            except Exception:
                log.exception("rpc stats observer %r failed; ignored", obs)

    def totals(self) -> Mapping[tuple[str, str], MethodTotals]:
        """A snapshot: ``{(method, code): MethodTotals}``."""
        with self._lock:
            return dict(self._totals)
