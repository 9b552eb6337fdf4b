"""Belady's MIN with bypass: the offline upper bound, for reports only.

It needs the future (each access's next use), so it exists only in the simulator and is never
registered as a live policy. On a miss the incoming block is cached only if it will be used
again before the resident block used furthest in the future; otherwise it is bypassed, which
is what makes MIN optimal for a cache that may decline to admit.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from kvtier.errors import InvalidArgument

NEVER = 1 << 62


def next_uses(accesses: Sequence[int]) -> list[int]:
    """For each position, the position of the next access to the same block (or NEVER)."""
    out = [NEVER] * len(accesses)
    last: dict[int, int] = {}
    for i in range(len(accesses) - 1, -1, -1):
        b = accesses[i]
        out[i] = last.get(b, NEVER)
        last[b] = i
    return out


def belady_hits(accesses: Sequence[int], capacity: int) -> list[bool]:
    """Hit or miss for every access under MIN with bypass at ``capacity`` slots."""
    if capacity < 1:
        raise InvalidArgument(f"must be at least 1 slot, got {capacity}", field="capacity")
    nxt = next_uses(accesses)
    resident: dict[int, int] = {}  # block -> its next use
    heap: list[tuple[int, int]] = []  # (-next use, block), lazily deleted
    out = [False] * len(accesses)
    for i, b in enumerate(accesses):
        nu = nxt[i]
        if b in resident:
            out[i] = True
            if nu == NEVER:
                del resident[b]
            else:
                resident[b] = nu
                heapq.heappush(heap, (-nu, b))
            continue
        if nu == NEVER:
            continue
        if len(resident) >= capacity:
            while -heap[0][0] != resident.get(heap[0][1]):
                heapq.heappop(heap)
            if -heap[0][0] <= nu:
                continue  # bypass: every resident block is needed sooner
            del resident[heapq.heappop(heap)[1]]
        resident[b] = nu
        heapq.heappush(heap, (-nu, b))
    return out
