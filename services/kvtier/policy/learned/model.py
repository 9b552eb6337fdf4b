"""The learned policy's models and the replacement core the simulator runs.

:class:`LearnedModel` turns each request into features (:mod:`kvtier.policy.learned.features`), asks
the torch predictor for every block's time to next access, and hands the labels the stream
supplies back to it; the live policy uses it for prefetching and reports its loss and accuracy.

Admission and eviction follow the online reuse density (:mod:`kvtier.policy.learned.density`): on
the conversation trace it beat the predictor's single expected gap per block by about 2 points of
hit ratio at 1% of the blocks (0.3-0.7 at 5-10%), because the hazard of a conversation's return
is not monotone in age.
:class:`LearnedCore` runs it guarded by set dueling against LRU. Until enough labels have
arrived it behaves exactly like LRU and says so in :attr:`LearnedCore.detail`.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from kvtier.policy.classic import LRUCore
from kvtier.policy.core import Key, ReplacementCore
from kvtier.policy.learned.density import DensityCache, ReuseDensity
from kvtier.policy.learned.features import BlockHistory
from kvtier.policy.learned.predictor import Predictor


HORIZON_PER_SLOT = 8
"""Label horizon in accesses per cache slot: reuse later than a few cache lifetimes is as
good as never for a cache of that size, and a short horizon keeps censored labels timely.
(Belady's hits at 1% of the conversation trace have a median gap of about 3 cache sizes.)"""


DUEL_MARGIN = 0.002
"""How far ahead (hits per access over the duel window) the density shadow must be."""


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




class LearnedCore(DensityCache):
    """The learned policy as the simulator runs it, guarded by set dueling.

    Two shadow caches of the same capacity (metadata only) run beside the real one: plain LRU
    and the density cache. Once the model has enough labels the real cache admits and evicts
    by density, unless the LRU shadow has recently hit clearly more often than the density
    shadow; then it is LRU (until the density shadow is clearly ahead again), and
    :attr:`detail` says why. This keeps the learned policy from doing
    worse than LRU on a trace (or a phase of one) where the learned densities do not pay off.
    """

    def __init__(self, capacity: int, model: ReuseDensity | None = None, *,
                 seed: int = 0) -> None:
        horizon = max(4096, HORIZON_PER_SLOT * capacity)
        super().__init__(capacity, model or ReuseDensity(horizon), seed=seed)
        self._shadow_lru = LRUCore(capacity)
        self._shadow = DensityCache(capacity, self.model, seed=seed + 1)
        self._shadow.use_model = True
        self._lead = 0.0  # decayed (density shadow hits - LRU shadow hits)
        self._decay = 1.0 - 1.0 / self.model.horizon
        self._window = float(self.model.horizon)
        self.model_requests = 0
        self.requests = 0

    @property
    def detail(self) -> str:
        if not self.model.ready:
            mode = "lru fallback (untrained)"
        elif not self.use_model:
            mode = "lru fallback (lru ahead in shadow)"
        else:
            mode = "learned (reuse density)"
        return (f"{mode}; model decided {self.model_requests}/{self.requests} requests; "
                f"labelled={self.model.labelled} bypassed={self.bypassed}")

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
        classes = self.model.observe(keys)
        self.set_request(keys, classes)
        self._shadow.set_request(keys, classes)
        base = self._replay(self._shadow_lru, keys)
        fade = self._decay ** len(keys)
        self._lead = (self._lead + self._replay(self._shadow, keys) - base) * fade
        # Hysteresis: once trained the model decides until the LRU shadow is clearly ahead (by
        # DUEL_MARGIN of the window's accesses), and takes over again only once its own shadow
        # is clearly ahead, so a tie does not flip the cache back and forth (each flip costs
        # hits while the cache refills to the other policy's taste).
        margin = DUEL_MARGIN * self._window
        if not self.model.ready:
            self.use_model = False
        elif self.use_model or self.model_requests == 0:
            self.use_model = self._lead > -margin
        else:
            self.use_model = self._lead > margin
        self.requests += 1
        self.model_requests += self.use_model
