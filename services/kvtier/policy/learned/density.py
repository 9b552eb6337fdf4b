"""Reuse density: which blocks earn their slot, learned online from the reuse gaps of the past.

Prefix-chain traffic has a shape that a single "expected next access" misses. A conversation's
blocks come back together when, and only if, the conversation continues, and the chance of that
is low right after a turn (the user is reading), peaks a few minutes later and then fades: the
hazard of reuse is not monotone in a block's age, so neither LRU's order nor one predicted gap
per block ranks blocks well. Following LHD (Beckmann et al., NSDI'18, "least hit density") the
policy therefore keeps, for each *class* of blocks, the distribution of reuse gaps seen so far,
and ranks a block of class c at age a by its hit density

    HD(c, a) = P(reused before the horizon | not reused by age a)
               / E[remaining slot-time until reuse or the horizon | age a],

that is, expected hits per slot per access if it is kept. Eviction removes the lowest hit
density among a random sample of resident blocks; admission bypasses a newcomer whose density
at age 0 is below that of the block it would displace. Both thresholds therefore adapt online
to the cache size and the traffic: nothing is tuned to a trace.

Classes are coarse, chain-structural facts known at access time, never key values: how often the
block was accessed before (log buckets), whether it is the tail of the request's chain (a
prompt's partial last block is re-hashed by the next turn), how many turns the chain has had,
and whether the block was in the already-known part of the chain. Labels come only from the
past: a block's pending gap is resolved when it recurs, or censored when the horizon passes.
Histograms decay slowly, so a trace whose behaviour drifts is followed.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable, Sequence

import numpy as np


BINS_PER_OCTAVE = 4
"""Age resolution: gaps are binned on a log scale, four bins per doubling."""

COUNT_BUCKETS = 6  # prior accesses: 0, 1, 2, 3-4, 5-8, 9+
TURN_BUCKETS = 5  # turns of the chain: 1, 2, 3-4, 5-8, 9+
N_CLASSES = COUNT_BUCKETS * 2 * TURN_BUCKETS * 2

PRIOR_SAMPLES = 20.0
"""Pseudo-samples of the all-class gap distribution added to each class: a class seen rarely
looks like the average block until its own labels say otherwise."""

RECOMPUTE_EVERY = 2048
"""Accesses between recomputations of the hit-density table (at most an eighth of the
horizon), and once more as soon as the model first has enough labels."""

MEMORY_HORIZONS = 16.0
"""Histograms forget with a time constant of this many horizons (slow drift tracking)."""


def age_bin(age: float) -> int:
    """Log-scale bin of an age or gap in accesses (0 for age 0)."""
    return int(BINS_PER_OCTAVE * math.log2(1.0 + age)) if age > 0 else 0


def _log_bucket(x: int, top: int) -> int:
    """0 -> 0, 1 -> 1, 2 -> 2, 3-4 -> 3, 5-8 -> 4, ... capped at ``top - 1``."""
    return 0 if x <= 0 else min(top - 1, 1 + (x - 1).bit_length())


class ChainClasses:
    """Per-block counts and chain turns; maps a request's blocks to their classes.

    A chain's *turn* is one more than the turn of the deepest block it shares with earlier
    chains beyond their first block (the root is typically a system prompt shared by every
    conversation, which says nothing about this one).
    """

    def __init__(self, horizon: int) -> None:
        self.horizon = horizon
        self.count: dict[Hashable, int] = {}
        self.turn: dict[Hashable, int] = {}
        self.last: dict[Hashable, int] = {}
        self.seq = 0

    def observe(self, keys: Sequence[Hashable], start: int = 0,
                turn: int | None = None) -> list[int]:
        """Classes of ``keys`` (state before this request), then record the request.
        ``turn``: the request's turn in its session when a worker says so (a session hint);
        otherwise it is inferred from the chain."""
        count = self.count
        n = len(keys) + start
        known = 0
        while known < len(keys) and keys[known] in count:
            known += 1
        deep = known + start
        if turn is None:
            turn = 1 + self.turn.get(keys[known - 1], 0) if known and deep > 1 else 1
        tb = _log_bucket(turn - 1, TURN_BUCKETS)
        out: list[int] = []
        seq = self.seq
        for i, key in enumerate(keys):
            cb = _log_bucket(count.get(key, 0), COUNT_BUCKETS)
            tail = 1 if i + start == n - 1 else 0
            out.append(((cb * 2 + tail) * TURN_BUCKETS + tb) * 2 + (1 if i < known else 0))
            count[key] = count.get(key, 0) + 1
            if self.turn.get(key, 0) < turn:
                self.turn[key] = turn
            self.last[key] = seq + i
        self.seq = seq + len(keys)
        return out

    def prune(self) -> None:
        """Forget blocks idle for more than four horizons."""
        cutoff = self.seq - 4 * self.horizon
        for k in [k for k, s in self.last.items() if s < cutoff]:
            del self.last[k]
            del self.count[k]
            self.turn.pop(k, None)


class ReuseDensity:
    """Online per-class reuse-gap histograms and the hit-density table derived from them."""

    def __init__(self, horizon: int, *, min_labels: int = 2048) -> None:
        self.horizon = max(16, horizon)
        self.min_labels = min_labels
        self.classes = ChainClasses(self.horizon)
        self.nbins = age_bin(self.horizon - 1) + 1  # index nbins = censored (no reuse)
        lo = np.array([2.0 ** (b / BINS_PER_OCTAVE) - 1.0 for b in range(self.nbins + 1)])
        self._lo = lo  # lowest age of each bin
        mid = (lo[:-1] + lo[1:]) / 2.0
        self._mid = np.append(mid, float(self.horizon))  # censored blocks hold a slot H long
        self._hist = np.zeros((N_CLASSES, self.nbins + 1))
        # The last horizon of accesses, by sequence number modulo the horizon: each one's class
        # and whether it is still waiting for its reuse. Waiting blocks are censored at their
        # current age (Kaplan-Meier), so the estimate is not biased towards early reuse before
        # the first horizon's "never reused" labels arrive.
        self._ring_cls = np.zeros(self.horizon, dtype=np.int64)
        self._ring_open = np.zeros(self.horizon, dtype=bool)
        self._pending: dict[Hashable, tuple[int, int]] = {}  # key -> (seq, class)
        self._expiry: deque[tuple[int, Hashable]] = deque()
        self._since = 0
        self._every = max(16, min(RECOMPUTE_EVERY, self.horizon // 8))
        self._decay = math.exp(-self._every / (MEMORY_HORIZONS * self.horizon))
        self._computed = False
        self.labelled = 0
        self.table: list[list[float]] = [[1.0] * (self.nbins + 1) for _ in range(N_CLASSES)]
        self.average = 0.0  # density of the average block at age 0 (all classes pooled)

    @property
    def ready(self) -> bool:
        return self._computed

    @property
    def now(self) -> int:
        return self.classes.seq

    def observe(self, keys: Sequence[Hashable], start: int = 0,
                turn: int | None = None) -> list[int]:
        """Label the earlier accesses these keys resolve, then classify and queue them."""
        seq0 = self.classes.seq
        cls = self.classes.observe(keys, start, turn)
        self._expire(seq0 + len(keys))
        pending = self._pending
        hist = self._hist
        for i, key in enumerate(keys):
            s = seq0 + i
            old = pending.get(key)
            if old is not None:
                hist[old[1], age_bin(s - old[0])] += 1.0
                self.labelled += 1
                self._ring_open[old[0] % self.horizon] = False
            pending[key] = (s, cls[i])
            self._ring_cls[s % self.horizon] = cls[i]
            self._ring_open[s % self.horizon] = True
            self._expiry.append((s, key))
        self._since += len(keys)
        if self._since >= self._every or (not self._computed
                                          and self.labelled >= self.min_labels):
            self._since = 0
            self.recompute()
            self.classes.prune()
        return cls

    def _expire(self, now: int) -> None:
        q = self._expiry
        pending = self._pending
        censored = self.nbins
        while q and q[0][0] <= now - self.horizon:
            s, key = q.popleft()
            old = pending.get(key)
            if old is not None and old[0] == s:
                del pending[key]
                self._hist[old[1], censored] += 1.0
                self.labelled += 1

    def _waiting(self) -> np.ndarray:
        """Blocks of the last horizon still waiting for their reuse, by (class, age bin)."""
        now, h = self.now, self.horizon
        idx = np.arange(h)
        seq = now - 1 - ((now - 1 - idx) % h)
        age = now - seq
        keep = self._ring_open & (seq >= 0) & (age < h)
        bins = (BINS_PER_OCTAVE * np.log2(1.0 + age[keep])).astype(np.int64)
        flat = self._ring_cls[keep] * (self.nbins + 1) + np.minimum(bins, self.nbins - 1)
        counts = np.bincount(flat, minlength=N_CLASSES * (self.nbins + 1))
        return counts.reshape(N_CLASSES, self.nbins + 1).astype(np.float64)

    def recompute(self) -> None:
        """Hit density of every (class, age bin) from the decayed histograms.

        Per bin b: hazard = reuses in b / blocks still at risk at b (reused at b or later,
        censored at the horizon, or waiting at b or older); survival is the running product.
        A block's expected hits from bin a on are the sum of survival x hazard, its expected
        slot-time the sum of survival x time spent in each bin; their ratio is the density.
        """
        nb = self.nbins
        waiting = self._waiting()[:, :nb]
        reuse = self._hist[:, :nb]
        censored = self._hist[:, nb:]
        total = reuse.sum() + waiting.sum() + censored.sum()
        if total <= 0:
            return
        k = PRIOR_SAMPLES / total
        reuse = reuse + reuse.sum(axis=0) * k
        waiting = waiting + waiting.sum(axis=0) * k
        censored = censored + censored.sum() * k
        at_risk = np.cumsum((reuse + waiting)[:, ::-1], axis=1)[:, ::-1] + censored
        hazard = np.where(at_risk > 0, reuse / np.maximum(at_risk, 1e-12), 0.0)
        survival = np.cumprod(np.concatenate([np.ones((N_CLASSES, 1)), 1.0 - hazard[:, :-1]],
                                             axis=1), axis=1)
        lo = self._lo
        width = lo[1:] - lo[:-1]
        spent = hazard * (self._mid[:nb] - lo[:nb]) + (1.0 - hazard) * width
        hits = np.cumsum((survival * hazard)[:, ::-1], axis=1)[:, ::-1]
        life = np.cumsum((survival * spent)[:, ::-1], axis=1)[:, ::-1]
        density = np.where(life > 0, hits / np.maximum(life, 1e-12), 0.0)
        weight = reuse.sum(axis=1) + waiting.sum(axis=1) + censored[:, 0]
        self.average = float((hits[:, 0] * weight).sum() / max((life[:, 0] * weight).sum(),
                                                                1e-12))
        self.table = np.concatenate([density, np.zeros((N_CLASSES, 1))], axis=1).tolist()
        self._hist *= self._decay
        self._computed = self.labelled >= self.min_labels

    def density(self, cls: int, age: float) -> float:
        """Expected hits per slot per access of a class-``cls`` block ``age`` accesses old."""
        b = age_bin(age) if age < self.horizon else self.nbins
        return self.table[cls][min(b, self.nbins)]
