"""The learned replacement core: evict and admit by the predictor's expected next access.

:class:`LearnedModel` turns each request into features (:mod:`kvtier.policy.features`), asks
the predictor for every block's time to next access, and hands the labels the stream supplies
back to it. :class:`LearnedCore` keeps, for every resident block, the expected sequence number
of its next access and acts like Belady's MIN on those expectations: it evicts the block
expected furthest in the future, and bypasses a missing block that is expected later than
that victim (admission control matters most when the cache is small). Until the predictor has
enough labels it behaves exactly like LRU and says so in :attr:`LearnedCore.detail`.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Hashable, Sequence

from kvtier.policy.baselines import LRUCore
from kvtier.policy.core import Key, ReplacementCore
from kvtier.policy.features import BlockHistory
from kvtier.policy.predictor import Predictor


HORIZON_PER_SLOT = 4
"""Label horizon in accesses per cache slot: reuse later than a few cache lifetimes is as
good as never for a cache of that size, and a short horizon keeps censored labels timely."""


DUEL_MARGIN = 0.002
"""How far ahead (hits per access over the duel window) the predictor's shadow must be."""


class LearnedModel:
    """History + predictor; shared by the cores of a tier stack. Not thread-safe."""

    def __init__(self, horizon: int, *, seed: int = 0, device: str = "cpu",
                 min_labels: int = 2048, train_every: int = 128) -> None:
        self.history = BlockHistory(horizon)
        self.predictor = Predictor(self.history.horizon, seed=seed, device=device,
                                   min_labels=min_labels, train_every=train_every)
        self.expected: dict[Hashable, float] = {}  # key -> expected seq of its next access
        self._since_prune = 0

    @property
    def ready(self) -> bool:
        return self.predictor.ready

    @property
    def now(self) -> int:
        return self.history.seq

    def observe(self, keys: Sequence[Hashable], start: int = 0) -> None:
        """One request's chain (from chain position ``start``): features, predictions,
        labels, expectations."""
        seq0, rows = self.history.observe(keys, start)
        preds = self.predictor.predict(rows)
        self.predictor.observe(keys, seq0, rows, preds)
        to_gap = self.predictor.to_gap
        exp = self.expected
        for i, key in enumerate(keys):
            exp[key] = seq0 + i + to_gap(preds[i])
        self._since_prune += len(keys)
        if self._since_prune >= 4 * self.history.horizon:
            self._since_prune = 0
            self.history.prune()
            live = self.history.last
            for k in [k for k in exp if k not in live]:
                del exp[k]


class PredictedCache(ReplacementCore):
    """MIN on predicted next accesses, with bypass, while :attr:`use_model`; LRU otherwise.

    Blocks still unused twice their predicted gap after their last access were mispredicted
    and leave first, so stale predictions cannot pin a block forever.
    """

    name = "learned"

    def __init__(self, capacity: int, model: LearnedModel) -> None:
        super().__init__(capacity)
        self.model = model
        self.use_model = False
        self.leader: PredictedCache | None = None  # lower tiers follow the top tier's mode
        self._res: OrderedDict[Key, tuple[float, int]] = OrderedDict()  # LRU order
        self._heap: list[tuple[float, int]] = []  # (-expected, ident), lazily deleted
        self._due: list[tuple[float, int]] = []  # (overdue-after, ident), lazily deleted
        self._keys: dict[int, Key] = {}
        self._ident = 0
        self.bypassed = 0

    def __contains__(self, key: Key) -> bool:
        return key in self._res

    def __len__(self) -> int:
        return len(self._res)

    def _mode(self) -> bool:
        return self.leader.use_model if self.leader is not None else self.use_model

    def _expected(self, key: Key) -> float:
        return self.model.expected.get(key, float(self.model.now))

    def _put(self, key: Key) -> None:
        old = self._res.pop(key, None)
        if old is not None:
            self._keys.pop(old[1], None)
        self._ident += 1
        e = self._expected(key)
        now = float(self.model.now)
        self._res[key] = (e, self._ident)
        self._keys[self._ident] = key
        heapq.heappush(self._heap, (-e, self._ident))
        # A block still unused twice its predicted gap after its access was mispredicted.
        heapq.heappush(self._due, (e + max(e - now, 1.0), self._ident))

    def _top(self) -> tuple[float, Key]:
        heap = self._heap
        while True:
            neg, ident = heap[0]
            key = self._keys.get(ident)
            if key is not None:
                return -neg, key
            heapq.heappop(heap)

    def _overdue(self) -> Key | None:
        due = self._due
        now = self.model.now
        while due:
            t, ident = due[0]
            key = self._keys.get(ident)
            if key is None:
                heapq.heappop(due)
                continue
            return key if t < now else None
        return None

    def hit(self, key: Key) -> None:
        self._put(key)

    def admit(self, key: Key) -> bool:
        if not self._mode() or len(self._res) < self.capacity:
            return True
        # An overdue resident counts as "not needed within the horizon": a newcomer expected
        # sooner replaces it, one expected later still does not get in.
        late = self._overdue() is not None
        bar = self.model.now + self.model.history.horizon if late else self._top()[0]
        if self._expected(key) >= bar:
            self.bypassed += 1
            return False
        return True

    def _victim(self) -> Key:
        if self._mode():
            late = self._overdue()
            return late if late is not None else self._top()[1]
        return next(iter(self._res))

    def insert(self, key: Key) -> list[Key]:
        out: list[Key] = []
        while len(self._res) >= self.capacity:
            victim = self._victim()
            self.remove(victim)
            out.append(victim)
        self._put(key)
        return out

    def remove(self, key: Key) -> None:
        old = self._res.pop(key, None)
        if old is not None:
            self._keys.pop(old[1], None)

    def evict_key(self, key: Key) -> tuple[float, ...]:
        entry = self._res.get(key)
        if entry is None:
            return (float("-inf"), 0.0)
        if self._mode():
            return (-entry[0], float(entry[1]))
        return (float(entry[1]),)


class LearnedCore(PredictedCache):
    """The learned policy as the simulator runs it, guarded by set dueling against LRU.

    Two shadow caches of the same capacity (metadata only) run beside the real one: plain LRU
    and the predictor's MIN. The real cache follows the predictor only while it is trained and
    its shadow has recently hit at least as often as the LRU shadow; otherwise it falls back
    to LRU and :attr:`detail` says why. This keeps the learned policy from doing worse than
    LRU on a trace (or a phase of one) where its predictions do not pay off.
    """

    def __init__(self, capacity: int, model: LearnedModel | None = None, *, seed: int = 0,
                 device: str = "cpu") -> None:
        horizon = max(4096, HORIZON_PER_SLOT * capacity)
        super().__init__(capacity, model or LearnedModel(horizon, seed=seed, device=device))
        self._shadow_lru = LRUCore(capacity)
        self._shadow_pred = PredictedCache(capacity, self.model)
        self._shadow_pred.use_model = True
        self._lead = 0.0  # decayed (predictor shadow hits - LRU shadow hits)
        self._decay = 1.0 - 1.0 / self.model.history.horizon
        self._window = float(self.model.history.horizon)
        self.model_requests = 0
        self.requests = 0

    @property
    def detail(self) -> str:
        st = self.model.predictor.stats()
        if not st.ready:
            mode = "lru fallback (untrained)"
        elif not self.use_model:
            mode = "lru fallback (lru ahead in shadow)"
        else:
            mode = "learned"
        return (f"{mode}; model decided {self.model_requests}/{self.requests} requests; "
                f"labelled={st.labelled} steps={st.steps} loss={st.loss:.4f} "
                f"accuracy={st.accuracy:.3f} bypassed={self.bypassed}")

    def begin_request(self, keys: Sequence[Key], now_s: float) -> None:
        self.model.observe(keys)
        lead = self._lead
        decay = self._decay
        for shadow, sign in ((self._shadow_lru, -1.0), (self._shadow_pred, 1.0)):
            for key in keys:
                if key in shadow:
                    shadow.hit(key)
                    lead += sign
                elif shadow.admit(key):
                    shadow.insert(key)
        self._lead = lead * decay ** len(keys)
        # Hysteresis: the model takes over only once its shadow is clearly ahead (by
        # DUEL_MARGIN of the window's accesses), so a tie does not flip the cache back and forth.
        self.use_model = self.model.ready and self._lead > DUEL_MARGIN * self._window
        self.requests += 1
        self.model_requests += self.use_model
