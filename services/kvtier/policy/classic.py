"""Classic replacement cores: LRU, LFU, ARC and S3-FIFO.

Each is the textbook algorithm over slots (one key = one slot) so that replay figures compare
with the literature, plus an :meth:`evict_key` that ranks any resident key by the same
preference, which is what the store's ``victims()`` uses. ARC is Megiddo & Modha (FAST'03);
S3-FIFO is Yang et al. (SOSP'23): a small FIFO (10%) filtering one-hit wonders, a main FIFO
with 2-bit frequency reinsertion, and a ghost FIFO as large as the main one.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict

from kvtier.policy.core import Key, ReplacementCore

_UNKNOWN: tuple[float, ...] = (-1.0, 0.0)


class LRUCore(ReplacementCore):
    name = "lru"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._od: OrderedDict[Key, int] = OrderedDict()
        self._clock = 0

    def __contains__(self, key: Key) -> bool:
        return key in self._od

    def __len__(self) -> int:
        return len(self._od)

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def hit(self, key: Key) -> None:
        self._od[key] = self._tick()
        self._od.move_to_end(key)

    def insert(self, key: Key) -> list[Key]:
        out: list[Key] = []
        while len(self._od) >= self.capacity:
            out.append(self._od.popitem(last=False)[0])
        self._od[key] = self._tick()
        return out

    def remove(self, key: Key) -> None:
        self._od.pop(key, None)

    def evict_key(self, key: Key) -> tuple[float, ...]:
        stamp = self._od.get(key)
        return _UNKNOWN if stamp is None else (float(stamp),)


class LFUCore(ReplacementCore):
    """Fewest accesses while resident leaves first; ties by least recent access."""

    name = "lfu"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._entry: dict[Key, tuple[int, int]] = {}
        self._heap: list[tuple[int, int, int]] = []  # (count, stamp, id) with lazy deletion
        self._ids: dict[int, Key] = {}
        self._clock = 0

    def __contains__(self, key: Key) -> bool:
        return key in self._entry

    def __len__(self) -> int:
        return len(self._entry)

    def _push(self, key: Key, count: int) -> None:
        self._clock += 1
        self._entry[key] = (count, self._clock)
        self._ids[self._clock] = key
        heapq.heappush(self._heap, (count, self._clock, self._clock))

    def hit(self, key: Key) -> None:
        count, stamp = self._entry[key]
        del self._ids[stamp]
        self._push(key, count + 1)

    def _pop(self) -> Key:
        while True:
            count, stamp, ident = heapq.heappop(self._heap)
            key = self._ids.get(ident)
            if key is not None and self._entry.get(key) == (count, stamp):
                del self._entry[key]
                del self._ids[ident]
                return key

    def insert(self, key: Key) -> list[Key]:
        out: list[Key] = []
        while len(self._entry) >= self.capacity:
            out.append(self._pop())
        self._push(key, 1)
        return out

    def remove(self, key: Key) -> None:
        entry = self._entry.pop(key, None)
        if entry is not None:
            self._ids.pop(entry[1], None)

    def evict_key(self, key: Key) -> tuple[float, ...]:
        entry = self._entry.get(key)
        return _UNKNOWN if entry is None else (float(entry[0]), float(entry[1]))


class ARCCore(ReplacementCore):
    """Adaptive Replacement Cache: recency list T1, frequency list T2, ghosts B1/B2."""

    name = "arc"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.t1: OrderedDict[Key, int] = OrderedDict()
        self.t2: OrderedDict[Key, int] = OrderedDict()
        self.b1: OrderedDict[Key, None] = OrderedDict()
        self.b2: OrderedDict[Key, None] = OrderedDict()
        self.p = 0.0
        self._clock = 0

    def __contains__(self, key: Key) -> bool:
        return key in self.t1 or key in self.t2

    def __len__(self) -> int:
        return len(self.t1) + len(self.t2)

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def hit(self, key: Key) -> None:
        self.t1.pop(key, None)
        self.t2.pop(key, None)
        self.t2[key] = self._tick()

    def _replace(self, in_b2: bool) -> Key:
        if self.t1 and ((in_b2 and len(self.t1) == self.p) or len(self.t1) > self.p):
            old = self.t1.popitem(last=False)[0]
            self.b1[old] = None
        else:
            old = self.t2.popitem(last=False)[0]
            self.b2[old] = None
        return old

    def insert(self, key: Key) -> list[Key]:
        c = self.capacity
        out: list[Key] = []
        full = len(self) >= c
        if key in self.b1:
            self.p = min(float(c), self.p + max(len(self.b2) / len(self.b1), 1.0))
            del self.b1[key]
            if full:
                out.append(self._replace(False))
            self.t2[key] = self._tick()
            return out
        if key in self.b2:
            self.p = max(0.0, self.p - max(len(self.b1) / len(self.b2), 1.0))
            del self.b2[key]
            if full:
                out.append(self._replace(True))
            self.t2[key] = self._tick()
            return out
        l1 = len(self.t1) + len(self.b1)
        if l1 >= c:
            if len(self.t1) < c:
                self.b1.popitem(last=False)
                if full:
                    out.append(self._replace(False))
            else:
                out.append(self.t1.popitem(last=False)[0])
        else:
            total = l1 + len(self.t2) + len(self.b2)
            if total >= c:
                if total >= 2 * c and self.b2:
                    self.b2.popitem(last=False)
                if full:
                    out.append(self._replace(False))
        self.t1[key] = self._tick()
        return out

    def remove(self, key: Key) -> None:
        self.t1.pop(key, None)
        self.t2.pop(key, None)

    def evict_key(self, key: Key) -> tuple[float, ...]:
        # The list REPLACE would take from goes first, each in LRU order.
        t1_first = len(self.t1) > self.p
        if key in self.t1:
            return (0.0 if t1_first else 1.0, float(self.t1[key]))
        if key in self.t2:
            return (1.0 if t1_first else 0.0, float(self.t2[key]))
        return _UNKNOWN


class S3FIFOCore(ReplacementCore):
    """S3-FIFO: small FIFO S (10%), main FIFO M, ghost G; frequency capped at 3."""

    name = "s3fifo"
    small_fraction = 0.1

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.small_cap = max(1, int(capacity * self.small_fraction))
        self.main_cap = max(1, capacity - self.small_cap)
        self.s: OrderedDict[Key, int] = OrderedDict()  # key -> insertion stamp; end = head
        self.m: OrderedDict[Key, int] = OrderedDict()
        self.g: OrderedDict[Key, None] = OrderedDict()
        self.freq: dict[Key, int] = {}
        self._clock = 0

    def __contains__(self, key: Key) -> bool:
        return key in self.freq

    def __len__(self) -> int:
        return len(self.freq)

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def hit(self, key: Key) -> None:
        self.freq[key] = min(self.freq[key] + 1, 3)

    def _evict_main(self) -> Key | None:
        while self.m:
            key, _ = self.m.popitem(last=False)
            f = self.freq[key]
            if f > 0:
                self.freq[key] = f - 1
                self.m[key] = self._tick()
            else:
                del self.freq[key]
                return key
        return None

    def _evict_small(self, out: list[Key]) -> None:
        while self.s:
            key, _ = self.s.popitem(last=False)
            if self.freq[key] > 0:
                self.freq[key] = 0
                self.m[key] = self._tick()
                if len(self.m) > self.main_cap:
                    victim = self._evict_main()
                    if victim is not None:
                        out.append(victim)
                        return
            else:
                del self.freq[key]
                self.g[key] = None
                if len(self.g) > self.main_cap:
                    self.g.popitem(last=False)
                out.append(key)
                return

    def insert(self, key: Key) -> list[Key]:
        out: list[Key] = []
        while len(self.freq) >= self.capacity:
            before = len(out)
            if len(self.s) >= self.small_cap or not self.m:
                self._evict_small(out)
            else:
                victim = self._evict_main()
                if victim is not None:
                    out.append(victim)
            if len(out) == before:
                break
        self.freq[key] = 0
        if key in self.g:
            del self.g[key]
            self.m[key] = self._tick()
        else:
            self.s[key] = self._tick()
        return out

    def remove(self, key: Key) -> None:
        if self.freq.pop(key, None) is not None:
            self.s.pop(key, None)
            self.m.pop(key, None)

    def evict_key(self, key: Key) -> tuple[float, ...]:
        f = self.freq.get(key)
        if f is None:
            return _UNKNOWN
        if key in self.s:
            return (0.0 if f == 0 else 2.0, float(self.s[key]))
        return (1.0 if f == 0 else 2.0 + f, float(self.m[key]))
