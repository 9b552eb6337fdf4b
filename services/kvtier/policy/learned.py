"""The learned replacement core: admit and evict by the predictor's expected next access.

:class:`LearnedModel` turns each request into features (:mod:`kvtier.policy.features`), asks
the predictor for every block's time to next access, and hands the labels the stream supplies
back to it. :class:`PredictedCache` admits a block only if it is expected back before the
cache would evict it, and evicts, among a sample of the least recently used blocks, the one
expected back last. :class:`LearnedCore` adds set dueling against LRU. Until the predictor has
enough labels it behaves exactly like LRU and says so in :attr:`LearnedCore.detail`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence

from kvtier.policy.baselines import LRUCore
from kvtier.policy.core import Key, ReplacementCore
from kvtier.policy.features import BlockHistory
from kvtier.policy.predictor import Predictor


HORIZON_PER_SLOT = 4
"""Label horizon in accesses per cache slot: reuse later than a few cache lifetimes is as
good as never for a cache of that size, and a short horizon keeps censored labels timely."""


EVICTION_SAMPLE = 8
"""How many of the least recently used blocks the predictor chooses the victim from."""

ADMIT_SLACK = 1.5
"""Admit blocks expected back within this multiple of the residence time: residence is an
average (some blocks stay much longer), and a wrong bypass costs a sure hit while a wrong
admission only costs a slot for a while."""

RESIDENCE_DECAY = 1e-3
"""Weight of each eviction in the residence-time average (about the last thousand)."""

DUEL_SLACKS = (1.0, ADMIT_SLACK)
"""Admission slacks the simulator's learned core duels between (and against LRU)."""

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
    """LRU whose admission and eviction follow the predictor while :attr:`use_model`.

    Admission: on a miss with the cache full, a block is cached only if it is expected back
    within the cache's residence time (the recent age of evicted blocks at eviction); anything
    expected later would be evicted unused, so it bypasses. This is where a small cache gains
    most. Eviction: of the ``EVICTION_SAMPLE`` least recently used blocks, the one expected
    back last leaves. With the model off (untrained, or losing the duel) it is plain LRU.
    """

    name = "learned"

    def __init__(self, capacity: int, model: LearnedModel) -> None:
        super().__init__(capacity)
        self.model = model
        self.use_model = False
        self.leader: PredictedCache | None = None  # lower tiers follow the top tier's mode
        self._res: OrderedDict[Key, int] = OrderedDict()  # key -> last access; LRU first
        self.residence = float(capacity)  # EMA of the age of evicted blocks, in accesses
        self.slack = ADMIT_SLACK
        self._last_eviction = 0
        self.bypassed = 0

    def __contains__(self, key: Key) -> bool:
        return key in self._res

    def __len__(self) -> int:
        return len(self._res)

    def _mode(self) -> bool:
        return self.leader.use_model if self.leader is not None else self.use_model

    def _expected(self, key: Key) -> float:
        return self.model.expected.get(key, float(self.model.now))

    def hit(self, key: Key) -> None:
        self._res[key] = self.model.now
        self._res.move_to_end(key)

    def admit(self, key: Key) -> bool:
        if not self._mode() or len(self._res) < self.capacity:
            return True
        now = self.model.now
        # While nothing is evicted a newcomer would stay at least that long: the bar rises, so
        # a strict phase cannot lock the cache with what it holds.
        slack = self.leader.slack if self.leader is not None else self.slack
        bar = max(slack * self.residence, now - self._last_eviction)
        if self._expected(key) - now < bar:
            return True
        self.bypassed += 1
        return False

    def _victim(self) -> Key:
        it = iter(self._res)
        if not self._mode():
            return next(it)
        sample = [next(it) for _ in range(min(EVICTION_SAMPLE, len(self._res)))]
        return max(sample, key=self._expected)

    def insert(self, key: Key) -> list[Key]:
        out: list[Key] = []
        now = self.model.now
        while len(self._res) >= self.capacity:
            victim = self._victim()
            age = now - self._res.pop(victim)
            self.residence += (age - self.residence) * RESIDENCE_DECAY
            self._last_eviction = now
            out.append(victim)
        self._res[key] = now
        return out

    def remove(self, key: Key) -> None:
        self._res.pop(key, None)

    def evict_key(self, key: Key) -> tuple[float, ...]:
        last = self._res.get(key)
        if last is None:
            return (float("-inf"), 0.0)
        if self._mode():
            return (-self._expected(key), float(last))
        return (float(last),)


class LearnedCore(PredictedCache):
    """The learned policy as the simulator runs it, guarded by set dueling.

    Shadow caches of the same capacity (metadata only) run beside the real one: plain LRU and
    the predictor's cache at each admission slack in ``DUEL_SLACKS``. The real cache follows
    the best predictor shadow, with that slack, while the model is trained and that shadow has
    recently hit clearly more often than the LRU shadow; otherwise it falls back to LRU and
    :attr:`detail` says why. This keeps the learned policy from doing worse than LRU on a trace
    (or a phase of one) where its predictions do not pay off, and picks how strict admission
    should be for this cache size without a per-trace constant.
    """

    def __init__(self, capacity: int, model: LearnedModel | None = None, *, seed: int = 0,
                 device: str = "cpu") -> None:
        horizon = max(4096, HORIZON_PER_SLOT * capacity)
        super().__init__(capacity, model or LearnedModel(horizon, seed=seed, device=device))
        self._shadow_lru = LRUCore(capacity)
        self._shadows: list[PredictedCache] = []
        for slack in DUEL_SLACKS:
            shadow = PredictedCache(capacity, self.model)
            shadow.use_model = True
            shadow.slack = slack
            self._shadows.append(shadow)
        self._leads = [0.0] * len(self._shadows)  # decayed (shadow hits - LRU shadow hits)
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
            mode = f"learned (admission slack {self.slack})"
        return (f"{mode}; model decided {self.model_requests}/{self.requests} requests; "
                f"labelled={st.labelled} steps={st.steps} loss={st.loss:.4f} "
                f"accuracy={st.accuracy:.3f} bypassed={self.bypassed}")

    @staticmethod
    def _replay(cache: ReplacementCore, keys: Sequence[Key]) -> int:
        hits = 0
        for key in keys:
            if key in cache:
                cache.hit(key)
                hits += 1
            elif cache.admit(key):
                cache.insert(key)
        return hits

    def begin_request(self, keys: Sequence[Key], now_s: float) -> None:
        self.model.observe(keys)
        base = self._replay(self._shadow_lru, keys)
        fade = self._decay ** len(keys)
        for i, shadow in enumerate(self._shadows):
            self._leads[i] = (self._leads[i] + self._replay(shadow, keys) - base) * fade
        best = max(range(len(self._leads)), key=self._leads.__getitem__)
        # Hysteresis: the model takes over only once a shadow is clearly ahead (by
        # DUEL_MARGIN of the window's accesses), so a tie does not flip the cache back and forth.
        self.use_model = self.model.ready and self._leads[best] > DUEL_MARGIN * self._window
        if self.use_model:
            self.slack = self._shadows[best].slack
        self.requests += 1
        self.model_requests += self.use_model
