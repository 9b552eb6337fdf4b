"""Baselines pinned on hand-made traces (exact hit counts), Belady against brute force."""

from __future__ import annotations

import functools
import itertools
import random

import pytest

from kvtier.errors import InvalidArgument
from kvtier.policy.classic import ARCCore, LFUCore, LRUCore, S3FIFOCore
from kvtier.lab.replay.belady import belady_hits
from kvtier.lab.replay.runner import run_policy
from kvtier.lab.replay.sim import capacity_blocks, split_capacity

from .helpers import make_trace, singles


@pytest.mark.parametrize(("policy", "seq", "cap", "hits"), [
    # a b a c b a: LRU evicts b for c, then a for b, then c for a.
    ("lru", "abacba", 2, 1),
    # a a b c a: LFU keeps a (2 accesses) when c arrives; LRU had evicted it.
    ("lru", "aabca", 2, 1),
    ("lfu", "aabca", 2, 2),
    # ARC: a goes to T2 on its hit; the one-timers b, c only churn T1 (scan resistance).
    ("arc", "aabcda", 2, 2),
    ("lru", "aabcda", 2, 1),
    # ARC: ghost hit on c in B1 raises p, a ghost hit on a in B2 lowers it; both are misses.
    ("arc", "abacadca", 2, 2),
    # S3-FIFO (cap 2 -> small 1, main 1): a is hit in S, so at eviction it moves to M and b,
    # a one-hit wonder, leaves to the ghost; a then hits in M.
    ("s3fifo", "aabca", 2, 2),
    # c evicts a (the small FIFO's tail, never hit); b is still in S and hits.
    ("s3fifo", "abcb", 2, 1),
    # e evicts a to the ghost; a comes back from the ghost into M (a miss), then hits there.
    ("s3fifo", "abcdeaa", 4, 1),
    ("belady", "abcabc", 2, 2),
])
def test_pinned_hit_counts(policy: str, seq: str, cap: int, hits: int) -> None:
    r = run_policy(singles(seq), policy, cap)
    assert (r.hits, r.accesses) == (hits, len(seq))


def test_chain_requests_count_hits_and_prefix_hits() -> None:
    # Request 3 reuses blocks 0 and 2 but not 1, so only block 0 is a usable prefix hit.
    trace = make_trace([0, 1, 2], [3], [0, 4, 2])
    r = run_policy(trace, "lru", 10)
    assert (r.hits, r.prefix_hits, r.request_hits) == (2, 1, (0, 0, 2))


def test_tier_stack_demotes_and_promotes() -> None:
    # 1-slot hot tier over a 2-slot cold tier: a is demoted by b, then by c, found in cold.
    trace = singles("abca")
    r = run_policy(trace, "lru", 3, tiers=[("hot", 1), ("cold", 2)])
    assert r.tiers == {"hot": 0, "cold": 1}
    r = run_policy(singles("abab"), "lru", 3, tiers=[("hot", 1), ("cold", 2)])
    assert r.tiers == {"hot": 0, "cold": 2}
    r = run_policy(singles("aab"), "lru", 3, tiers=[("hot", 1), ("cold", 2)])
    assert r.tiers == {"hot": 1, "cold": 0}


def _brute_force(seq: list[int], cap: int) -> int:
    @functools.lru_cache(maxsize=None)
    def best(i: int, cache: frozenset[int]) -> int:
        if i == len(seq):
            return 0
        b = seq[i]
        if b in cache:
            return 1 + best(i + 1, cache)
        options = [best(i + 1, cache)]  # bypass
        if len(cache) < cap:
            options.append(best(i + 1, cache | {b}))
        else:
            options += [best(i + 1, (cache - {v}) | {b}) for v in cache]
        return max(options)

    return best(0, frozenset())


def test_belady_matches_brute_force_on_tiny_traces() -> None:
    rng = random.Random(7)
    for _ in range(150):
        seq = [rng.randrange(5) for _ in range(rng.randrange(1, 11))]
        cap = rng.randrange(1, 4)
        assert sum(belady_hits(seq, cap)) == _brute_force(seq, cap), (seq, cap)


def test_belady_bounds_every_policy() -> None:
    rng = random.Random(3)
    chains = [[rng.randrange(30) for _ in range(1)] for _ in range(400)]
    trace = make_trace(*chains)
    opt = run_policy(trace, "belady", 8).hits
    for name in ("lru", "lfu", "arc", "s3fifo"):
        assert run_policy(trace, name, 8).hits <= opt


@pytest.mark.parametrize("core", [LRUCore, LFUCore, ARCCore, S3FIFOCore])
def test_cores_never_exceed_capacity_and_order_residents(core: type) -> None:
    c = core(4)
    rng = random.Random(1)
    for _ in range(500):
        k = rng.randrange(12)
        if k in c:
            c.hit(k)
        else:
            for gone in c.insert(k):
                assert gone not in c
        assert len(c) <= 4
    resident = [k for k in range(12) if k in c]
    assert sorted(c.evict_order(resident)) == sorted(resident)


def test_capacity_parsing_and_splitting() -> None:
    trace = make_trace(*[[i] for i in range(200)])
    assert capacity_blocks(trace, 0.05) == 10
    assert capacity_blocks(trace, 37) == 37
    with pytest.raises(InvalidArgument, match="capacity"):
        capacity_blocks(trace, 0)
    with pytest.raises(InvalidArgument, match="capacity"):
        capacity_blocks(trace, 2.5)
    assert split_capacity(23, [("hot", 1), ("warm", 2), ("cold", 4), ("remote", 16)]) == [
        ("hot", 1), ("warm", 2), ("cold", 4), ("remote", 16)]
    with pytest.raises(InvalidArgument, match="capacity"):
        split_capacity(2, [("a", 1), ("b", 1), ("c", 1)])


def test_unknown_policy_names_the_field() -> None:
    with pytest.raises(InvalidArgument, match="policy"):
        run_policy(singles("ab"), "mru", 2)


def test_every_lru_hit_needs_a_prior_access() -> None:
    for seq in itertools.islice(itertools.product("abc", repeat=5), 50):
        r = run_policy(singles("".join(seq)), "lru", 1)
        assert r.hits == sum(1 for x, y in zip(seq, seq[1:]) if x == y)
