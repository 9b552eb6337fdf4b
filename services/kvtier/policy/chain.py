"""Prefix-closed caching in replay: a chain's blocks are kept, ranked and evicted together.

A paged KV cache can use block k of a request only if blocks 0..k-1 are there too, so a block
kept without its predecessor is a slot spent on nothing. :class:`PrefixCore` is a replacement
core that never keeps one:

- it learns each block's predecessor from the chain it is shown (``begin_request``),
- it admits a block only when its predecessor is resident (or the block is a chain's root),
- it evicts only *leaves* (resident blocks with no resident successor), so a chain is cut from
  its tail and a predecessor leaves only after every block that needs it,
- an outside removal (:meth:`PrefixCore.remove`) takes the block's resident descendants too,
- blocks of the request being served are pinned, and blocks of requests a worker says are
  queued (:meth:`PrefixCore.hint_queue`) are pinned and always admitted,
- blocks last used by a session the worker says has ended (:meth:`PrefixCore.hint_session`)
  leave first.

Which leaf goes is the subclass's ranking (:meth:`PrefixCore.leaf_rank`, lower leaves first).
:class:`PrefixCore` itself is prefix-closed LRU: a request touches its whole chain at once, so
a chain's blocks share one stamp (the request's), and among equal stamps the deepest block goes
first. It is exact (a heap of leaves); the learned core (:mod:`kvtier.policy.learned.model`)
samples leaves and ranks them by reuse density.

:func:`~kvtier.store.chains.chain_order` is the same rule for a ranking of given keys (the
store's victims).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Hashable, Iterable, Sequence

from kvtier.policy.core import Key, ReplacementCore
from kvtier.store.chains import chain_order

LEAF_SAMPLE = 64
"""Leaves sampled per eviction by sampling subclasses (LHD's associativity)."""



class _Entry:
    """A resident block: its resident predecessor, resident successors, last use, depth."""

    __slots__ = ("children", "depth", "parent", "stamp")

    def __init__(self, parent: Key | None, stamp: int, depth: int) -> None:
        self.parent = parent
        self.children = 0
        self.stamp = stamp
        self.depth = depth


class PrefixCore(ReplacementCore):
    """Prefix-closed residency over chains, prefix-closed LRU order (module docstring)."""

    name = "chain-lru"

    def __init__(self, capacity: int, *, seed: int = 0) -> None:
        super().__init__(capacity)
        self._res: dict[Key, _Entry] = {}
        self._leaves: list[Key] = []  # slot list: O(1) random sampling and removal
        self._lpos: dict[Key, int] = {}
        self._heap: list[tuple[int, int, int, Key]] = []  # (stamp, -depth, tie, leaf), lazy
        self._tie = 0
        self._parent_now: dict[Key, Key | None] = {}  # predecessors in the current request
        self._pinned: set[Key] = set()
        self._queued: set[Key] = set()
        self._session_of: dict[Key, Hashable] = {}  # block -> last session that used it
        self._session: Hashable | None = None
        self._ended: set[Hashable] = set()
        self._rng = random.Random(seed)
        self.stamp = 0
        self.orphans_refused = 0

    # -- structure ----------------------------------------------------------------------------

    def __contains__(self, key: Key) -> bool:
        return key in self._res

    def __len__(self) -> int:
        return len(self._res)

    def parent(self, key: Key) -> Key | None:
        """The resident predecessor of ``key`` (None for a root or an unknown key)."""
        entry = self._res.get(key)
        if entry is not None:
            return entry.parent
        return self._parent_now.get(key)

    def leaves(self) -> list[Key]:
        """Resident blocks with no resident successor: the only ones that may be evicted."""
        return list(self._leaves)

    def orphans(self) -> list[Key]:
        """Resident blocks whose predecessor is not resident (always empty: a check)."""
        return [k for k, e in self._res.items()
                if e.parent is not None and e.parent not in self._res]

    def _add_leaf(self, key: Key) -> None:
        if key in self._lpos:
            return
        self._lpos[key] = len(self._leaves)
        self._leaves.append(key)
        self._push(key)

    def _push(self, key: Key) -> None:
        e = self._res[key]
        self._tie += 1
        heapq.heappush(self._heap, (e.stamp, -e.depth, self._tie, key))

    def _del_leaf(self, key: Key) -> None:
        i = self._lpos.pop(key, None)
        if i is None:
            return
        last = self._leaves.pop()
        if i < len(self._leaves):
            self._leaves[i] = last
            self._lpos[last] = i

    # -- requests and hints -------------------------------------------------------------------

    def begin_request(self, keys: Sequence[Key], now_s: float) -> None:
        self.stamp += 1
        self._parent_now = {k: (keys[i - 1] if i else None) for i, k in enumerate(keys)}
        self._pinned = set(keys)

    def hint_queue(self, chains: Sequence[Sequence[Key]]) -> None:
        self._queued = {k for chain in chains for k in chain}

    def hint_session(self, session: Hashable | None, ended: Sequence[Hashable] = ()) -> None:
        self._session = session
        self._ended.update(ended)
        if session is not None:
            self._ended.discard(session)

    def _ended_leaf(self, key: Key) -> bool:
        s = self._session_of.get(key)
        return s is not None and s in self._ended

    # -- the simulator's calls ----------------------------------------------------------------

    def _used(self, key: Key) -> None:
        """Hook: ``key`` was used by the current request (hit or insert)."""

    def hit(self, key: Key) -> None:
        e = self._res[key]
        e.stamp = self.stamp
        if self._session is not None:
            self._session_of[key] = self._session
        if key in self._lpos:
            self._push(key)
        self._used(key)

    def _parent_ok(self, key: Key) -> bool:
        p = self._parent_now.get(key)
        return p is None or p in self._res

    def admit(self, key: Key) -> bool:
        """Never a block whose predecessor is missing; otherwise :meth:`admit_more`."""
        if not self._parent_ok(key):
            self.orphans_refused += 1
            return False
        if key in self._queued or len(self._res) < self.capacity:
            return True
        if self._queued and self._choose_victim(strict=False) is None:
            return False  # every leaf is needed by a queued request
        return self.admit_more(key)

    def admit_more(self, key: Key) -> bool:
        """Whether a newcomer (predecessor present, cache full) displaces a leaf."""
        return True

    def insert(self, key: Key) -> list[Key]:
        out: list[Key] = []
        while len(self._res) >= self.capacity:
            victim = self._choose_victim(strict=True)
            if victim is None:
                victim = self._choose_victim(strict=False)
            if victim is None:
                victim = self._any_leaf()
            if victim is None:
                break
            self._unlink(victim)
            out.append(victim)
        parent = self._parent_now.get(key)
        depth = 0
        if parent is not None and parent in self._res:
            pe = self._res[parent]
            pe.children += 1
            self._del_leaf(parent)
            depth = pe.depth + 1
        else:
            parent = None
        self._res[key] = _Entry(parent, self.stamp, depth)
        if self._session is not None:
            self._session_of[key] = self._session
        self._add_leaf(key)
        self._used(key)
        return out

    def _left(self, key: Key) -> None:
        """Hook: ``key`` is no longer resident."""

    def _unlink(self, key: Key) -> None:
        entry = self._res.pop(key)
        self._del_leaf(key)
        self._session_of.pop(key, None)
        parent = entry.parent
        if parent is not None:
            pe = self._res.get(parent)
            if pe is not None:
                pe.children -= 1
                if pe.children <= 0:
                    pe.children = 0
                    self._add_leaf(parent)
        self._left(key)

    def remove(self, key: Key) -> None:
        """An outside decision took ``key``: its resident descendants go too (orphans)."""
        if key not in self._res:
            return
        for k in self._subtree(key):
            self._unlink(k)

    def _subtree(self, key: Key) -> list[Key]:
        """``key`` and its resident descendants, deepest first."""
        children: dict[Key, list[Key]] = {}
        for k, e in self._res.items():
            if e.parent is not None:
                children.setdefault(e.parent, []).append(k)
        order: list[Key] = []
        stack = [key]
        while stack:
            k = stack.pop()
            order.append(k)
            stack.extend(children.get(k, ()))
        order.sort(key=lambda k: -self._res[k].depth)
        return order

    # -- ranking ------------------------------------------------------------------------------

    def _evictable(self, key: Key, strict: bool) -> bool:
        return key not in self._queued and (not strict or key not in self._pinned)

    def _any_leaf(self) -> Key | None:
        return self._leaves[0] if self._leaves else None

    def _choose_victim(self, strict: bool) -> Key | None:
        """The leaf to evict: ended sessions' first, then the lowest :meth:`leaf_rank`."""
        if self._ended:
            for k in self._sample():
                if self._ended_leaf(k) and self._evictable(k, strict):
                    return k
        return self._lowest_leaf(strict)

    def _sample(self) -> list[Key]:
        leaves = self._leaves
        n = len(leaves)
        if n <= LEAF_SAMPLE:
            return list(leaves)
        rnd = self._rng.random
        return [leaves[int(rnd() * n)] for _ in range(LEAF_SAMPLE)]

    def _lowest_leaf(self, strict: bool) -> Key | None:
        """Exact prefix-closed LRU: the top of the leaf heap (stale entries dropped)."""
        heap = self._heap
        skipped = []
        victim = None
        while heap:
            stamp, negd, _, k = heap[0]
            e = self._res.get(k)
            if e is None or k not in self._lpos or e.stamp != stamp:
                heapq.heappop(heap)
                continue
            if not self._evictable(k, strict):
                skipped.append(heapq.heappop(heap))
                continue
            victim = k
            break
        for item in skipped:
            heapq.heappush(heap, item)
        if len(heap) > 4 * len(self._leaves) + 1024:
            self._heap = [(self._res[k].stamp, -self._res[k].depth, i, k)
                          for i, k in enumerate(self._leaves)]
            heapq.heapify(self._heap)
        return victim

    def leaf_rank(self, key: Key) -> tuple[float, ...]:
        """Sort key of a resident block by its own merit: lower leaves first."""
        e = self._res[key]
        return (float(e.stamp), float(-e.depth))

    def evict_key(self, key: Key) -> tuple[float, ...]:
        if key not in self._res:
            return (float("-inf"),)
        return self.leaf_rank(key)

    def evict_order(self, keys: Iterable[Key]) -> list[Key]:
        """``keys`` in eviction order, prefix-closed (see :func:`chain_order`)."""
        return chain_order(list(keys), self.parent, self.evict_key)
