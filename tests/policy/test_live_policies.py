"""Policies behind the store's interface: ARC/S3-FIFO adapters, the learned policy, registry."""

from __future__ import annotations

import pytest

from kvtier.config import PolicyConfig
from kvtier.errors import InvalidArgument
from kvtier.policy.adapter import ARCPolicy, S3FIFOPolicy
from kvtier.policy.learned.policy import LearnedPolicy
from kvtier.policy.registry import policy_names
from kvtier.store.policy import AccessKind, LFUPolicy, LRUPolicy
from kvtier.transport.policy.client import make_policy

from .helpers import event, meta, pid


def test_registry_builds_every_live_policy_and_never_belady() -> None:
    assert policy_names() == ["arc", "learned", "lfu", "lru", "s3fifo"]
    kinds = {n: type(make_policy(PolicyConfig(name=n))) for n in policy_names()}
    assert kinds == {"arc": ARCPolicy, "learned": LearnedPolicy, "lfu": LFUPolicy,
                     "lru": LRUPolicy, "s3fifo": S3FIFOPolicy}
    with pytest.raises(InvalidArgument, match="policy.*belady.*known: arc"):
        make_policy(PolicyConfig(name="belady"))


def test_arc_policy_ranks_only_the_given_candidates_by_arc_order() -> None:
    p = ARCPolicy()
    # a and b accessed twice (T2), c once (T1): ARC with p=0 lets T1 go first.
    seq = 0
    for name in ["a", "b", "c", "a", "b"]:
        seq += 1
        p.record([event(name, seq)])
    cands = [meta("a", 4), meta("b", 5), meta("c", 3)]
    assert p.victims(cands, 3) == [pid("c"), pid("a"), pid("b")]
    assert p.victims(cands[:2], 1) == [pid("a")]
    scores = p.score(cands)
    assert scores.index(min(scores)) == 2
    p.forget([pid("c")])
    # A candidate the policy has not heard of (its events are still queued) joins T1 like any
    # first access, so it goes before the twice-used a, not before everything unconditionally.
    assert p.victims([meta("z", 9), meta("a", 4)], 2) == [pid("z"), pid("a")]
    assert p.victims([meta("z", 9), meta("y", 10), meta("a", 4)], 3) == [
        pid("z"), pid("y"), pid("a")]


def test_s3fifo_policy_evicts_one_hit_wonders_first() -> None:
    p = S3FIFOPolicy()
    p.record([event("a", 1), event("b", 2), event("a", 3), event("c", 4)])
    assert p.victims([meta("a", 3), meta("b", 2), meta("c", 4)], 2) == [pid("b"), pid("c")]
    # Lookups and GET misses are not accesses of the data.
    p.record([event("b", 5, AccessKind.LOOKUP), event("b", 6, tier=None)])
    assert p.victims([meta("a", 3), meta("b", 2)], 1) == [pid("b")]


def _chains(policy: LearnedPolicy, rounds: int) -> None:
    """Chain x0..x3 recurs every round; each round also carries a fresh 6-block chain."""
    seq = 0
    for r in range(rounds):
        evs = []
        for j in range(4):
            seq += 1
            evs.append(event(f"x{j}", seq, chain=j))
        for j in range(6):
            seq += 1
            evs.append(event(f"f{r}-{j}", seq, AccessKind.PUT, chain=j))
        policy.record(evs)


def test_learned_policy_falls_back_to_lru_until_trained_then_scores() -> None:
    p = LearnedPolicy(horizon=64, min_labels=200, train_every=4, device="cpu")
    st = p.status()
    assert (st.name, st.active, st.fallback_active) == ("learned", "lru", True)
    cands = [meta("x0", 5, count=3), meta("old", 9)]
    assert p.score(cands) == [5.0, 9.0]  # LRU scores: last access sequence
    _chains(p, 80)
    st = p.status()
    assert (st.active, st.fallback_active) == ("learned", False), st.detail
    now = p.model.now
    # The recurring block is expected back soon; the last fresh one is not.
    x0 = meta("x0", now, count=120)
    fresh = meta("f79-5", now, count=1)
    assert p.victims([x0, fresh], 1) == [pid("f79-5")]
    assert p.admit(x0, "hot") is True
    assert p.admit(fresh, "hot") is False
    # A page the policy has not heard of yet is not treated as the coldest (it is late).
    unknown = meta("new", now, count=1)
    assert p.victims([unknown, fresh], 1) == [pid("f79-5")]


def test_learned_policy_prefetches_pages_expected_back_from_lower_tiers() -> None:
    p = LearnedPolicy(horizon=64, min_labels=200, train_every=4, device="cpu")
    _chains(p, 80)
    assert p.prefetch(4) == []
    seq = p.model.now
    # x0..x3 get served from a lower tier this round: they become prefetch candidates.
    p.record([event(f"x{j}", seq + j + 1, tier="cold", chain=j) for j in range(4)])
    # One round of fresh traffic brings the clock close to their next expected use.
    p.record([event(f"g-{j}", seq + 5 + j, AccessKind.PUT, chain=j) for j in range(6)])
    got = p.prefetch(2)
    assert got and set(got) <= {pid(f"x{j}") for j in range(4)}
    assert p.prefetch(0) == []
