"""The learned predictor as a live store policy (embedded in the daemon or the policy service).

Access events arrive in batches from the store, possibly interleaving requests; each run of
events with consecutive chain positions in one namespace is treated as one request's chain (a
worker reads or writes a chain in order). A GET miss followed by the PUT of the same page is one
access, not two. Scores are in "how soon is the next access expected": pages expected soonest
score highest; pages long overdue for their predicted reuse score lowest.

Falls back to LRU, and says so in :meth:`status`, until the predictor has enough labels. Pages
whose latest access the policy has not seen yet (its events are still queued: the policy is
late) are scored as if accessed now with a typical gap, so lag never makes a hot page look cold.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from kvtier.policy.adapter import DATA_ACCESSES
from kvtier.policy.learned import LearnedModel
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
        self.horizon = self.model.history.horizon
        self.top_tier = top_tier
        self._lock = threading.Lock()
        self._missed: dict[PageId, int] = {}  # page -> model clock of a GET miss not yet put
        self._lower: dict[PageId, None] = {}  # pages last seen outside the top tier
        # page -> (expected next access, overdue after, access count) on the model clock: one
        # lookup per candidate keeps a 64-candidate decision in tens of microseconds. A page
        # still unused twice its predicted gap after its last access was mispredicted.
        self._info: dict[PageId, tuple[float, float, int]] = {}
        self._typical_gap = float(self.horizon) / 4
        self.events = 0
        self.late = 0

    @property
    def ready(self) -> bool:
        return self.model.ready

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
        exp = self.model.expected
        now = self.model.now
        last = self.model.history.last
        count = self.model.history.count
        info = self._info
        for p in run:
            e = exp[p]
            info[p] = (e, e + max(e - last[p], 1.0), count[p])
        if len(info) > 2 * max(len(count), self.horizon):
            self._info = {p: v for p, v in info.items() if p in count}
        gaps = [exp[p] - now for p in run[-4:]]
        self._typical_gap = 0.99 * self._typical_gap + 0.01 * max(1.0, sum(gaps) / len(gaps))

    def forget(self, pages: Sequence[PageId]) -> None:
        with self._lock:
            for p in pages:
                self._lower.pop(p, None)

    # -- decisions ----------------------------------------------------------------------------

    def _expectations(self, pages: Sequence[PageMeta]) -> list[float]:
        """Expected model-clock time of each page's next access; overdue pages far away."""
        now = self.model.now
        get = self._info.get
        typical = now + self._typical_gap
        far = float(now + 2 * self.horizon)
        out = []
        late = 0
        for m in pages:
            v = get(m.page)
            if v is None or v[2] < m.access_count:
                out.append(typical)  # late: its latest access has not reached us yet
                late += 1
            else:
                out.append(far if v[1] < now else v[0])
        self.late += late
        return out

    def score(self, pages: Sequence[PageMeta]) -> list[float]:
        """Higher = keep. LRU order (last access sequence) until the predictor is ready."""
        with self._lock:
            if not self.model.ready:
                return [float(p.last_seq) for p in pages]
            now = self.model.now
            return [-(e - now) / self.horizon for e in self._expectations(pages)]

    def victims(self, candidates: Sequence[PageMeta], n: int) -> list[PageId]:
        """The ``n`` candidates expected back last (ties: least recently used first)."""
        if n <= 0 or not candidates:
            return []
        with self._lock:
            if not self.model.ready:
                order = sorted(range(len(candidates)), key=lambda i: candidates[i].last_seq)
            else:
                keyed = sorted(zip([-e for e in self._expectations(candidates)],
                                   [m.last_seq for m in candidates], range(len(candidates))))
                order = [k[2] for k in keyed]
        return [candidates[i].page for i in order[:n]]

    def admit(self, page: PageMeta, tier: str) -> bool:
        """A page expected back within half the horizon stays in ``tier``; else goes lower."""
        if not self.model.ready:
            return True
        with self._lock:
            e = self.model.expected.get(page.page)
            return e is None or e - self.model.now < self.horizon / 2

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
        detail = (f"labelled={st.labelled} steps={st.steps} loss={st.loss:.4f} "
                  f"accuracy={st.accuracy:.3f} events={self.events} late={self.late}")
        if st.ready:
            return PolicyStatus(self.name, self.name, False, detail,
                                loss=st.loss, online_accuracy=st.accuracy)
        return PolicyStatus(self.name, "lru", True, "untrained: " + detail,
                            loss=st.loss, online_accuracy=st.accuracy)
