"""The learned predictor as a live store policy (embedded in the daemon or the policy service).

Access events arrive in batches from the store, possibly interleaving requests; each run of
events with consecutive chain positions in one namespace is treated as one request's chain (a
worker reads or writes a chain in order). A GET miss followed by the PUT of the same page is one
access, not two. Victims and scores follow the online reuse density
(:mod:`kvtier.policy.learned.density`, as in replay): a page's score is the hits per slot its
class is expected to earn from its current age on, and the lowest leave first. Admission keeps a
page in the tier when its class earns at least the average page's density at age 0. Prefetching
follows the torch predictor's expected next access, whose loss and accuracy the status reports.

Falls back to LRU, and says so in :meth:`status`, until enough reuse labels have arrived. Pages
whose latest access the policy has not seen yet (its events are still queued: the policy is
late) score as the densest, so lag never makes a hot page look cold.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

from kvtier.policy.adapter import DATA_ACCESSES
from kvtier.policy.learned.density import BINS_PER_OCTAVE, ReuseDensity
from kvtier.policy.learned.model import LearnedModel
from kvtier.store.policy import AccessEvent, AccessKind, PageMeta, Policy, PolicyStatus
from kvtier.types import PageId

DEFAULT_HORIZON = 1 << 16


class LearnedPolicy(Policy):
    """Temporal importance predictor behind the store's policy interface."""

    name = "learned"

    def __init__(self, *, horizon: int = DEFAULT_HORIZON, seed: int = 0, device: str = "auto",
                 min_labels: int = 2048, train_every: int = 128, top_tier: str = "hot") -> None:
        self.model = LearnedModel(horizon, seed=seed, device=device, min_labels=min_labels,
                                  train_every=train_every)
        self.density = ReuseDensity(horizon, min_labels=min_labels)
        self.horizon = self.model.history.horizon
        self.top_tier = top_tier
        self._lock = threading.Lock()
        self._missed: dict[PageId, int] = {}  # page -> model clock of a GET miss not yet put
        self._lower: dict[PageId, None] = {}  # pages last seen outside the top tier
        # page -> (density class, last access on the model clock, access count): one lookup
        # per candidate keeps a 64-candidate decision in tens of microseconds.
        self._info: dict[PageId, tuple[int, int, int]] = {}
        self.events = 0
        self.late = 0

    @property
    def ready(self) -> bool:
        return self.density.ready

    # -- learning -----------------------------------------------------------------------------

    def record(self, events: Sequence[AccessEvent]) -> None:
        with self._lock:
            run: list[PageId] = []
            start = prev = -2
            for ev in events:
                if ev.kind not in DATA_ACCESSES:
                    continue
                self.events += 1
                self._note_tier(ev)
                if ev.kind is AccessKind.PUT and self._missed.pop(ev.page, None) is not None:
                    continue  # the miss already counted this access
                if ev.kind is AccessKind.GET and ev.tier_hit is None:
                    self._missed[ev.page] = self.model.now
                contiguous = (run and ev.chain_position == prev + 1
                              and ev.page.namespace == run[-1].namespace)
                if not contiguous:
                    self._flush(run, start)
                    run = []
                    start = ev.chain_position
                run.append(ev.page)
                prev = ev.chain_position
            self._flush(run, start)
            if len(self._missed) > self.horizon:
                cutoff = self.model.now - self.horizon
                self._missed = {p: s for p, s in self._missed.items() if s >= cutoff}

    def _note_tier(self, ev: AccessEvent) -> None:
        if ev.kind is AccessKind.GET and ev.tier_hit is not None and ev.tier_hit != self.top_tier:
            self._lower[ev.page] = None
        elif ev.kind in (AccessKind.PUT, AccessKind.PROMOTE) or ev.tier_hit == self.top_tier:
            self._lower.pop(ev.page, None)

    def _flush(self, run: list[PageId], start: int) -> None:
        if not run:
            return
        self.model.observe(run, max(start, 0))
        classes = self.density.observe(run, max(start, 0))
        last = self.model.history.last
        count = self.model.history.count
        info = self._info
        for p, c in zip(run, classes, strict=True):
            info[p] = (c, last[p], count[p])
        if len(info) > 2 * max(len(count), self.horizon):
            self._info = {p: v for p, v in info.items() if p in count}

    def forget(self, pages: Sequence[PageId]) -> None:
        with self._lock:
            for p in pages:
                self._lower.pop(p, None)

    # -- decisions ----------------------------------------------------------------------------

    def _densities(self, pages: Sequence[PageMeta]) -> list[float]:
        """Each page's expected hits per slot from its current age on; late pages first."""
        now = self.model.now
        get = self._info.get
        table = self.density.table
        horizon = self.density.horizon
        log2 = math.log2
        out = []
        late = 0
        for m in pages:
            v = get(m.page)
            if v is None or v[2] < m.access_count:
                out.append(math.inf)  # late: its latest access has not reached us yet
                late += 1
                continue
            age = now - v[1]
            out.append(table[v[0]][int(BINS_PER_OCTAVE * log2(1 + age))] if age < horizon
                       else 0.0)
        self.late += late
        return out

    def score(self, pages: Sequence[PageMeta]) -> list[float]:
        """Higher = keep. LRU order (last access sequence) until the model is ready."""
        with self._lock:
            if not self.ready:
                return [float(p.last_seq) for p in pages]
            return [min(d, 1.0) for d in self._densities(pages)]

    def victims(self, candidates: Sequence[PageMeta], n: int) -> list[PageId]:
        """The ``n`` candidates of lowest reuse density (ties: least recently used first)."""
        if n <= 0 or not candidates:
            return []
        with self._lock:
            if not self.ready:
                order = sorted(range(len(candidates)), key=lambda i: candidates[i].last_seq)
            else:
                keyed = sorted(zip(self._densities(candidates),
                                   [m.last_seq for m in candidates], range(len(candidates))))
                order = [k[2] for k in keyed]
        return [candidates[i].page for i in order[:n]]

    def admit(self, page: PageMeta, tier: str) -> bool:
        """A page whose class earns at least the average page's density stays in ``tier``."""
        if not self.ready:
            return True
        with self._lock:
            v = self._info.get(page.page)
            if v is None:
                return True
            return self.density.density(v[0], 0) >= self.density.average

    def prefetch(self, limit: int) -> list[PageId]:
        """Pages below the top tier expected back soonest (within an eighth of the horizon)."""
        if limit <= 0 or not self.model.ready:
            return []
        with self._lock:
            now = self.model.now
            exp = self.model.expected
            soon = [(exp[p], p) for p in self._lower
                    if p in exp and now <= exp[p] < now + self.horizon / 8]
        soon.sort(key=lambda t: t[0])
        return [p for _, p in soon[:limit]]

    def status(self) -> PolicyStatus:
        st = self.model.predictor.stats()
        detail = (f"reuse labels={self.density.labelled}; predictor labelled={st.labelled} "
                  f"steps={st.steps} loss={st.loss:.4f} accuracy={st.accuracy:.3f} "
                  f"events={self.events} late={self.late}")
        if self.ready:
            return PolicyStatus(self.name, self.name, False, detail,
                                loss=st.loss, online_accuracy=st.accuracy)
        return PolicyStatus(self.name, "lru", True, "untrained: " + detail,
                            loss=st.loss, online_accuracy=st.accuracy)
