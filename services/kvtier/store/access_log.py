"""A bounded queue of access events between the data path and the policy.

The data path appends (never blocks; when full the oldest events are dropped and counted); the
mover thread drains it into :meth:`Policy.record`, so a slow policy never slows a get.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable

from kvtier.store.policy import AccessEvent


class AccessLog:
    def __init__(self, maxlen: int) -> None:
        self._lock = threading.Lock()
        self._events: deque[AccessEvent] = deque(maxlen=maxlen)
        self.dropped = 0

    def extend(self, events: Iterable[AccessEvent]) -> None:
        with self._lock:
            for e in events:
                if len(self._events) == self._events.maxlen:
                    self.dropped += 1
                self._events.append(e)

    def drain(self) -> list[AccessEvent]:
        with self._lock:
            out = list(self._events)
            self._events.clear()
            return out

    def __len__(self) -> int:
        return len(self._events)
