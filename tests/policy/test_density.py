"""Reuse density: classes from chain structure only, hazards learned from past labels."""

from __future__ import annotations

import random

from kvtier.policy.learned.density import ChainClasses, ReuseDensity, age_bin


def test_classes_use_chain_structure_not_ids() -> None:
    a = ChainClasses(horizon=1000)
    b = ChainClasses(horizon=1000)
    first = a.observe([10, 11, 12])
    again = a.observe([10, 11, 99, 100])
    renamed = b.observe([7, 5000, 3])
    assert first == renamed  # the same history under other IDs gives the same classes
    assert again[0] != first[0]  # block 10 was seen before: another count bucket
    assert again[2] != again[3]  # the chain's tail is its own class
    assert again[3] != first[2]  # a second turn of the chain differs from a first


def _planted(density: ReuseDensity, rounds: int, period: int) -> None:
    """One chain [h0, h1] recurs every ``period`` accesses; one-off blocks fill the rest."""
    rng = random.Random(0)
    fresh = iter(rng.sample(range(10**7), rounds * period))
    for _ in range(rounds):
        density.observe(["h0", "h1"])
        for _ in range(period - 2):
            density.observe([next(fresh)])


def test_learns_when_reuse_comes_and_what_never_returns() -> None:
    d = ReuseDensity(horizon=256, min_labels=100)
    assert not d.ready
    _planted(d, 200, 40)
    assert d.ready
    hot = d.observe(["h0", "h1"])[1]
    cold = d.observe([-1])[0]  # a fresh one-block chain, like the one-offs
    # The recurring block earns far more per slot than a one-off, which is never reused.
    assert d.density(hot, 0) > 10 * d.density(cold, 0)
    # Its reuse comes at age ~40, not before: the density rises as that age nears (LRU's
    # "younger is better" would keep it least when it is most useful).
    assert d.density(hot, 38) > 1.5 * d.density(hot, 1)
    # Past the reuse age without a reuse, the block is not what it was.
    assert d.density(hot, 200) < d.density(hot, 30)
    assert d.average > d.density(cold, 0)


def test_waiting_blocks_are_censored_not_ignored() -> None:
    """Before any horizon passed, blocks still waiting count as survivors at their age."""
    d = ReuseDensity(horizon=10**6, min_labels=10)
    _planted(d, 20, 40)  # 800 accesses: no block has reached the horizon yet
    d.recompute()
    hot = d.observe(["h0", "h1"])[1]
    cold = d.observe([-1])[0]
    assert d.density(hot, 0) > 10 * d.density(cold, 0)


def test_age_bins_are_logarithmic() -> None:
    assert age_bin(0) == 0
    assert age_bin(1) == 4
    assert age_bin(3) == 8
    assert age_bin(1023) < age_bin(4095) < age_bin(16383)
