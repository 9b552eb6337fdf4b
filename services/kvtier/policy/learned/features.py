"""Per-block access history and the feature vector the predictor sees.

Everything here is computed from the past of the access stream and the request being served
now; nothing uses the value of a key (IDs are opaque; in traces they are dense in order of first
appearance, which would leak the future). The features describe what predicts reuse in prefix
chains: where the block sits in its chain and how far from the chain's end (the last, partial
block of a prompt almost never recurs, the next turn re-hashes it), how many requests touched
it and how recently, how many distinct continuations branch from it (shared-prefix
popularity), how much of the chain was already known (a continuing conversation), and the
gap since the chain's known part was last used (the turn interval).

The clock is the access sequence number, so gaps are in accesses, as are cache capacities.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

FEATURE_NAMES: tuple[str, ...] = (
    "chain_position", "blocks_to_end", "is_last", "chain_length", "access_count",
    "first_access", "gap", "previous_gap", "known_prefix", "in_known_prefix",
    "new_blocks", "children", "parent_count", "turn_gap", "age_of_chain_head",
)
N_FEATURES = len(FEATURE_NAMES)


def _lg(x: float) -> float:
    return math.log1p(x) if x > 0 else 0.0


class BlockHistory:
    """What the policy remembers of each block: count, last access, previous gap, children.

    Memory is bounded by :meth:`prune` (blocks idle longer than the horizon are forgotten; the
    features treat them as never seen, which is what they are for any cache of that size).
    """

    def __init__(self, horizon: int) -> None:
        self.horizon = max(16, horizon)
        self._gap_norm = math.log1p(self.horizon)
        self.count: dict[Hashable, int] = {}
        self.last: dict[Hashable, int] = {}
        self.prev_gap: dict[Hashable, int] = {}
        self.children: dict[Hashable, int] = {}
        self.seq = 0

    def __len__(self) -> int:
        return len(self.count)

    def _gap_feature(self, gap: int | None) -> float:
        if gap is None or gap >= self.horizon:
            return 1.0
        return _lg(gap) / self._gap_norm

    def observe(self, keys: Sequence[Hashable], start: int = 0) -> tuple[int, list[list[float]]]:
        """Features of each key of a request (state before it), then record the request.

        ``keys`` is the chain from position ``start`` on (a live batch may carry only the tail
        of a chain). Returns the sequence number of the first key (key i is ``seq0 + i``).
        """
        n = len(keys) + start
        seq0 = self.seq
        count = self.count
        last = self.last
        known = 0
        while known < len(keys) and keys[known] in count:
            known += 1
        head_gap = seq0 - last[keys[known - 1]] if known else None
        known += start
        first_gap = seq0 - last[keys[0]] if keys and keys[0] in last else None
        ln = _lg(n) / 8.0
        rows: list[list[float]] = []
        for i, key in enumerate(keys):
            j = i + start
            c = count.get(key, 0)
            s = seq0 + i
            gap = s - last[key] if c else None
            pgap = self.prev_gap.get(key) if c > 1 else None
            parent_c = count.get(keys[i - 1], 0) if i else 0
            rows.append([
                _lg(j) / 8.0, _lg(n - 1 - j) / 8.0, 1.0 if j == n - 1 else 0.0, ln,
                _lg(c) / 4.0, 0.0 if c else 1.0, self._gap_feature(gap),
                self._gap_feature(pgap), _lg(known) / 8.0, 1.0 if j < known else 0.0,
                _lg(n - known) / 8.0, _lg(self.children.get(key, 0)) / 4.0,
                _lg(parent_c) / 4.0, self._gap_feature(head_gap),
                self._gap_feature(first_gap),
            ])
        for i, key in enumerate(keys):
            s = seq0 + i
            c = count.get(key, 0)
            if c:
                self.prev_gap[key] = s - last[key]
            elif i:
                parent = keys[i - 1]
                self.children[parent] = self.children.get(parent, 0) + 1
            count[key] = c + 1
            last[key] = s
        self.seq = seq0 + len(keys)
        return seq0, rows

    def prune(self) -> int:
        """Forget blocks idle for more than four horizons; returns how many."""
        cutoff = self.seq - 4 * self.horizon
        stale = [k for k, s in self.last.items() if s < cutoff]
        for k in stale:
            del self.last[k]
            del self.count[k]
            self.prev_gap.pop(k, None)
            self.children.pop(k, None)
        return len(stale)
