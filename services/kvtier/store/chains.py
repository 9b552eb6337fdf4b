"""Prefix chains in the store: which page follows which, and eviction orders that respect it.

A worker reads and writes a request's pages as one key chain (block 0 first), so the store
learns each page's predecessor from its puts: pages of one put with consecutive chain
positions follow each other, and the first page of a put (at a position above 0) follows the
key named before it in the latest lookup or queue hint that named it while it was absent
(lookup, put the missing rest: what a worker does per request). Pages that were present when
looked up are never linked by the lookup (a lookup used as a probe of unrelated keys links
nothing). :class:`ChainLinks` keeps those links (bounded: the oldest go first past
``capacity``, and a page that left the cache forgets its own).

A paged KV cache can use a page only with all its predecessors, so the store is prefix-closed:
:func:`chain_order` turns any ranking into one where no page goes before a successor of it
(a chain is cut from its tail) and a chain's pages are ranked together, and a page that leaves
the cache takes its resident successors with it (they would be orphans). The policy ranks; this
module only keeps its ranking prefix-closed. Pure metadata, thread-safe (its own small lock).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, TypeVar

from kvtier.types import PageId

K = TypeVar("K", bound=Hashable)

DEFAULT_CAPACITY = 1 << 20
"""Links kept at most (a few tens of MB); beyond it the oldest are dropped."""


def chain_order(keys: Sequence[K], parent: Callable[[K], K | None],
                rank: Callable[[K], tuple[float, ...]]) -> list[K]:
    """Order ``keys`` for eviction so that none comes before a successor of it among them.

    ``parent(k)`` names k's predecessor (None for a root or unknown), ``rank(k)`` is k's own
    sort key (lower goes first). A chain is ranked together: a key's effective rank is the
    highest own rank in its subtree among ``keys`` (keeping it is needed for any of them to
    hit), and among equal effective ranks deeper keys go first. Cycles in ``parent`` (bad
    client input) are cut, never followed forever.
    """
    present = set(keys)
    depth: dict[K, int] = {}
    for k in keys:
        path: list[K] = []
        on_path: set[K] = set()
        cur: Any = k
        while cur is not None and cur in present and cur not in depth and cur not in on_path:
            path.append(cur)
            on_path.add(cur)
            cur = parent(cur)
        base = depth[cur] + 1 if cur is not None and cur in depth else 0
        for i, node in enumerate(reversed(path)):
            depth[node] = base + i
    eff = {k: rank(k) for k in keys}
    for k in sorted(keys, key=lambda x: -depth[x]):  # deepest first: children before parents
        up = parent(k)
        if up is not None and up in present and depth[up] < depth[k] and eff[k] > eff[up]:
            eff[up] = eff[k]
    return sorted(keys, key=lambda k: (eff[k], -depth[k]))


class ChainLinks:
    """Predecessor links between pages, learned from chain-ordered calls (module docstring)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._parent: OrderedDict[PageId, PageId] = OrderedDict()
        self._children: dict[PageId, set[PageId]] = {}
        self._pending: OrderedDict[PageId, PageId] = OrderedDict()  # absent key -> the one
        # named before it by a lookup: its parent once it is put

    def __len__(self) -> int:
        with self._lock:
            return len(self._parent)

    def _link(self, child: PageId, parent: PageId) -> None:
        if child == parent:
            return
        old = self._parent.get(child)
        if old is not None and old != parent:
            self._unlink_child(child)
        self._parent[child] = parent
        self._parent.move_to_end(child)
        self._children.setdefault(parent, set()).add(child)

    def _unlink_child(self, child: PageId) -> None:
        parent = self._parent.pop(child, None)
        if parent is not None:
            kids = self._children.get(parent)
            if kids is not None:
                kids.discard(child)
                if not kids:
                    del self._children[parent]

    def note_lookup(self, pids: Sequence[PageId], present: int) -> None:
        """A lookup (or queue hint) of the chain ``pids`` whose first ``present`` pages are
        there: each absent page remembers the key before it, for when it is put."""
        with self._lock:
            pending = self._pending
            for i in range(max(1, present), len(pids)):
                pending[pids[i]] = pids[i - 1]
                pending.move_to_end(pids[i])
            while len(pending) > self.capacity:
                pending.popitem(last=False)

    def note_put(self, pids: Sequence[PageId], positions: Sequence[int]) -> None:
        """A put's pages: consecutive chain positions are links; a page at a position above
        0 after a gap follows what a lookup named before it."""
        with self._lock:
            for i, pid in enumerate(pids):
                if i and positions[i] == positions[i - 1] + 1:
                    self._link(pid, pids[i - 1])
                    self._pending.pop(pid, None)
                elif positions[i] > 0:
                    before = self._pending.pop(pid, None)
                    if before is not None:
                        self._link(pid, before)
            while len(self._parent) > self.capacity:
                self._unlink_child(next(iter(self._parent)))

    def parent(self, pid: PageId) -> PageId | None:
        with self._lock:
            return self._parent.get(pid)

    def parents(self, pids: Iterable[PageId]) -> dict[PageId, PageId]:
        with self._lock:
            got = self._parent
            return {p: got[p] for p in pids if p in got}

    def children(self, pids: Iterable[PageId]) -> dict[PageId, tuple[PageId, ...]]:
        with self._lock:
            kids = self._children
            return {p: tuple(kids[p]) for p in pids if p in kids}

    def descendants(self, pid: PageId) -> list[PageId]:
        """Every page linked below ``pid`` (deepest last), cycles cut."""
        with self._lock:
            out: list[PageId] = []
            seen = {pid}
            stack = list(self._children.get(pid, ()))
            while stack:
                k = stack.pop()
                if k in seen:
                    continue
                seen.add(k)
                out.append(k)
                stack.extend(self._children.get(k, ()))
            return out

    def forget(self, pids: Iterable[PageId]) -> None:
        """These pages left the cache: their own links go (links to them stay, so successors
        still know they lost their predecessor)."""
        with self._lock:
            for p in pids:
                self._unlink_child(p)
