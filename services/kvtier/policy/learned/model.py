"""The learned policy's models and the replacement core the simulator runs.

:class:`LearnedModel` turns each request into features (:mod:`kvtier.policy.learned.features`), asks
the torch predictor for every block's time to next access, and hands the labels the stream
supplies back to it; the live policy uses it for prefetching and reports its loss and accuracy.

Admission and eviction follow the online reuse density (:mod:`kvtier.policy.learned.density`): on
the conversation trace it beat the predictor's single expected gap per block by about 2 points of
hit ratio at 1% of the blocks (0.3-0.7 at 5-10%), because the hazard of a conversation's return
is not monotone in age.
:class:`LearnedCore` runs it prefix-closed (:mod:`kvtier.policy.chain`), guarded by set
dueling against prefix-closed LRU on prefix hits. Until enough labels have arrived it behaves
exactly like prefix-closed LRU and says so in :attr:`LearnedCore.detail`.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from kvtier.policy.chain import PrefixCore
from kvtier.policy.core import Key, ReplacementCore
from kvtier.policy.learned.density import ReuseDensity
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




class DensityPrefixCore(PrefixCore):
    """Prefix-closed cache ranked by reuse density while :attr:`use_model` (else prefix-closed
    LRU): the evicted leaf is the lowest density of a random sample of leaves, and a newcomer
    whose class density at age 0 is below that leaf's is not admitted (nor, being
    prefix-closed, is anything after it in its chain).

    Blocks' (access sequence, class) come from the shared :class:`ReuseDensity`, which the
    leading core feeds; in a tier stack the lower tiers follow the leader's mode and get a
    demoted block's record handed down with it.
    """

    name = "learned"

    def __init__(self, capacity: int, model: ReuseDensity, *, seed: int = 0) -> None:
        super().__init__(capacity, seed=seed)
        self.model = model
        self.use_model = False
        self.leader: DensityPrefixCore | None = None
        self._meta: dict[Key, tuple[int, int]] = {}  # resident key -> (last seq, class)
        self._cur: dict[Key, tuple[int, int]] = {}  # the current request's keys
        self.handoff: dict[Key, tuple[int, int]] = {}  # leader: records of demoted blocks
        self.hands_down = False  # leader: lower tiers follow it (keep handoff records)
        self.bypassed = 0

    def _mode(self) -> bool:
        return self.leader.use_model if self.leader is not None else self.use_model

    def set_request(self, keys: Sequence[Key], classes: Sequence[int], seq0: int) -> None:
        self._cur = {k: (seq0 + i, c) for i, (k, c) in enumerate(zip(keys, classes,
                                                                      strict=True))}

    def _record(self, key: Key) -> tuple[int, int]:
        got = self._cur.get(key)
        if got is None and self.leader is not None:
            got = self.leader._cur.get(key)
        if got is None:
            top = self.leader if self.leader is not None else self
            got = top.handoff.pop(key, None)
        return got if got is not None else (self.model.now, 0)

    def _used(self, key: Key) -> None:
        self._meta[key] = self._record(key)

    def _left(self, key: Key) -> None:
        meta = self._meta.pop(key, None)
        top = self.leader if self.leader is not None else self
        if meta is not None and top.hands_down:
            top.handoff[key] = meta

    def _density(self, key: Key) -> float:
        seq, cls = self._meta[key]
        return self.model.density(cls, self.model.now - seq)

    def _lowest_leaf(self, strict: bool) -> Key | None:
        if not self._mode():
            return super()._lowest_leaf(strict)
        best: tuple[float, int] | None = None
        victim = None
        for k in self._sample():
            if not self._evictable(k, strict):
                continue
            r = (self._density(k), self._meta[k][0])
            if best is None or r < best:
                best, victim = r, k
        return victim

    def admit_more(self, key: Key) -> bool:
        if not self._mode():
            return True
        victim = self._lowest_leaf(strict=True)
        if victim is None:
            return False
        if self.model.density(self._record(key)[1], 0) >= self._density(victim):
            return True
        self.bypassed += 1
        return False

    def leaf_rank(self, key: Key) -> tuple[float, ...]:
        if not self._mode():
            return super().leaf_rank(key)
        return (self._density(key), float(self._meta[key][0]))


class LearnedCore(DensityPrefixCore):
    """The learned policy as the simulator runs it: prefix-closed, ranked by reuse density,
    guarded by set dueling on prefix hits.

    Two shadow caches of the same capacity (metadata only) run beside the real one:
    prefix-closed LRU and the density cache. Once the model has enough labels the real cache
    admits and evicts by density, unless the LRU shadow has recently had clearly more prefix
    hits than the density shadow; then it is prefix-closed LRU (until the density shadow is
    clearly ahead again), and :attr:`detail` says why. This keeps the learned policy from doing
    worse than LRU on a trace (or a phase of one) where the learned densities do not pay off.
    Hints (queue, sessions) reach the real cache and both shadows alike.
    """

    def __init__(self, capacity: int, model: ReuseDensity | None = None, *,
                 seed: int = 0) -> None:
        horizon = max(4096, HORIZON_PER_SLOT * capacity)
        super().__init__(capacity, model or ReuseDensity(horizon), seed=seed)
        self._shadow_lru = PrefixCore(capacity, seed=seed + 2)
        self._shadow = DensityPrefixCore(capacity, self.model, seed=seed + 1)
        self._shadow.use_model = True
        self._lead = 0.0  # decayed (density shadow prefix hits - LRU shadow prefix hits)
        self._decay = 1.0 - 1.0 / self.model.horizon
        self._window = float(self.model.horizon)
        self._turn: dict[Hashable, int] = {}  # session -> requests seen (session hints)
        self._session_turn: int | None = None
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
    def _replay(cache: ReplacementCore, keys: Sequence[Key], now_s: float) -> int:
        cache.begin_request(keys, now_s)
        hits = 0
        leading = True
        for key in keys:
            if key in cache:
                cache.hit(key)
                hits += leading
            else:
                leading = False
                if cache.admit(key):
                    cache.insert(key)
        return hits

    def hint_queue(self, chains: Sequence[Sequence[Key]]) -> None:
        super().hint_queue(chains)
        self._shadow_lru.hint_queue(chains)
        self._shadow.hint_queue(chains)

    def hint_session(self, session: Hashable | None, ended: Sequence[Hashable] = ()) -> None:
        super().hint_session(session, ended)
        self._shadow_lru.hint_session(session, ended)
        self._shadow.hint_session(session, ended)
        for s in ended:
            self._turn.pop(s, None)
        if session is None:
            self._session_turn = None
        else:
            self._session_turn = self._turn.get(session, 0) + 1
            self._turn[session] = self._session_turn

    def begin_request(self, keys: Sequence[Key], now_s: float) -> None:
        super().begin_request(keys, now_s)
        self.handoff.clear()
        seq0 = self.model.now
        classes = self.model.observe(keys, 0, self._session_turn)
        self._session_turn = None
        self.set_request(keys, classes, seq0)
        self._shadow.set_request(keys, classes, seq0)
        base = self._replay(self._shadow_lru, keys, now_s)
        fade = self._decay ** len(keys)
        self._lead = (self._lead + self._replay(self._shadow, keys, now_s) - base) * fade
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
