"""Prefix-closed caching and worker hints in replay: pinned on small hand-made traces."""

from __future__ import annotations

import random

import pytest

from kvtier.errors import InvalidArgument
from kvtier.lab.replay.hints import TraceHints
from kvtier.lab.replay.runner import learned_factory, run_policy
from kvtier.lab.replay.sim import simulate
from kvtier.lab.replay.synth import synthetic_trace
from kvtier.lab.replay.trace import Trace, TraceRequest
from kvtier.policy.chain import PrefixCore
from kvtier.store.chains import chain_order
from kvtier.policy.core import ReplacementCore
from kvtier.policy.learned.density import ReuseDensity
from kvtier.policy.learned.model import LearnedCore

from .helpers import make_trace


def _serve(core: ReplacementCore, chain: list[int]) -> int:
    """One request through ``core`` as the simulator does it; its prefix hits."""
    core.begin_request(chain, 0.0)
    lead = 0
    leading = True
    for k in chain:
        if k in core:
            core.hit(k)
            lead += leading
        else:
            leading = False
            if core.admit(k):
                core.insert(k)
    return lead


def _chains(n: int, seed: int) -> list[list[int]]:
    """Conversations over a shared root that grow, branch and come back."""
    rng = random.Random(seed)
    convs: list[list[int]] = []
    out = []
    nxt = 1
    for _ in range(n):
        if convs and rng.random() < 0.6:
            c = list(rng.choice(convs))
            c = c[: rng.randint(1, len(c))] + list(range(nxt, nxt + rng.randint(1, 3)))
        else:
            c = [0] + list(range(nxt, nxt + rng.randint(1, 6)))
        nxt = max(nxt, c[-1] + 1)
        convs.append(c)
        out.append(c)
    return out


def test_lru_evicts_a_chain_head_but_prefix_closed_lru_its_tail() -> None:
    # [0, 1, 2] fills 3 of 4 slots; [7, 8] needs one more: LRU evicts block 0 (the oldest),
    # which leaves 1 and 2 useless; prefix-closed LRU evicts the tail 2, so [0, 1] still hits.
    from kvtier.policy.classic import LRUCore

    lru, chain = LRUCore(4), PrefixCore(4)
    for core in (lru, chain):
        _serve(core, [0, 1, 2])
        _serve(core, [7, 8])
    assert 0 not in lru and 2 in lru
    assert 0 in chain and 1 in chain and 2 not in chain
    assert _serve(chain, [0, 1, 2]) == 2 and _serve(LRUCore(4), [0, 1, 2]) == 0


@pytest.mark.parametrize("make", [
    lambda: PrefixCore(12),
    lambda: LearnedCore(12, ReuseDensity(64, min_labels=20), seed=3),
])
def test_no_kept_orphans_and_only_leaves_leave(make: object) -> None:
    core = make()  # type: ignore[operator]
    for chain in _chains(400, seed=1):
        before = {k: core.parent(k) for k in list(core._res)}  # noqa: SLF001
        _serve(core, chain)
        assert core.orphans() == []
        assert len(core) <= core.capacity
        gone = set(before) - set(core._res)  # noqa: SLF001
        for k in gone:  # whatever left had no successor that stayed
            assert not any(core.parent(r) == k for r in core._res)  # noqa: SLF001
    if isinstance(core, LearnedCore):
        assert core.model.ready


def test_a_missing_predecessor_is_never_admitted() -> None:
    core = PrefixCore(8)
    core.begin_request([0, 1, 2], 0.0)
    assert core.admit(0)
    core.insert(0)
    core.begin_request([5, 6], 0.0)  # 5 is not resident: 6 may not come in after it
    assert not core.admit(6)
    assert core.orphans_refused == 1


def test_remove_takes_the_descendants_with_it() -> None:
    core = PrefixCore(8)
    _serve(core, [0, 1, 2, 3])
    _serve(core, [0, 1, 9])
    core.remove(1)
    assert 0 in core and all(k not in core for k in (1, 2, 3, 9))
    assert core.orphans() == []


def test_chain_order_ranks_a_chain_by_its_best_block_and_cuts_tails_first() -> None:
    parent = {1: 0, 2: 1, 11: 10}.get
    own = {0: 5.0, 1: 1.0, 2: 9.0, 10: 3.0, 11: 2.0}
    order = chain_order([0, 1, 2, 10, 11], parent, lambda k: (own[k],))
    # chain 10-11 (best 3) goes before chain 0-1-2 (best 9); within a chain, tail first
    assert order == [11, 10, 2, 1, 0]
    # a cycle (bad input) terminates
    assert sorted(chain_order([1, 2], {1: 2, 2: 1}.get, lambda k: (0.0,))) == [1, 2]


def test_a_queue_hint_keeps_a_queued_prefix() -> None:
    # 3 slots hold [0, 1, 2]; [3, 4, 5] would evict it, unless [0, 1, 2] is queued.
    plain, hinted = PrefixCore(3), PrefixCore(3)
    for core in (plain, hinted):
        _serve(core, [0, 1, 2])
    hinted.hint_queue([[0, 1, 2]])
    for core in (plain, hinted):
        _serve(core, [3, 4, 5])
    hinted.hint_queue([])
    assert _serve(hinted, [0, 1, 2]) == 3
    assert _serve(plain, [0, 1, 2]) == 0


def test_an_ended_session_leaves_first() -> None:
    core = PrefixCore(4)
    core.hint_session("a")
    _serve(core, [0, 1])
    core.hint_session("b")
    _serve(core, [5, 6])  # LRU would now evict a's 1 first anyway; touch a again
    core.hint_session("a")
    _serve(core, [0, 1])
    core.hint_session("c", ended=["a"])
    _serve(core, [8])  # needs one slot: a's tail goes, though b is older
    assert 1 not in core and 6 in core and 5 in core


def _trace(*reqs: tuple[int, list[int]]) -> Trace:
    return Trace("t", tuple(TraceRequest(ts, 512 * len(b), 1, tuple(b)) for ts, b in reqs))


def test_the_queue_holds_only_requests_that_have_arrived() -> None:
    trace = _trace((0, [0, 1]), (1000, [0, 2]), (1000, [0, 3]), (5000, [0, 1, 4]))
    hints = TraceHints(trace, queue=32)
    assert hints.at(0).queue == ()  # request 1 arrives later
    assert hints.at(1).queue == ((0, 3),)  # request 2 arrived at the same time; 3 not yet
    assert hints.at(2).queue == ()
    assert hints.at(3).queue == ()
    assert TraceHints(trace, queue=1).at(0).queue == ()
    with pytest.raises(InvalidArgument):
        TraceHints(trace).at(2)  # no skipping ahead


def test_sessions_are_chains_that_extend_each_other() -> None:
    trace = _trace((0, [0, 1, 2]), (1, [0, 7]), (2, [0, 1, 5, 6]), (3, [0, 1, 5, 8, 9]),
                   (4, [0, 9]))
    hints = TraceHints(trace)
    got = [hints.at(i).session for i in range(5)]
    # 2 extends 0 (all but 0's partial last block); 3 extends 2; a shared root alone is not
    # a session
    assert got == [0, 1, 0, 0, 2]


def test_a_planted_future_request_changes_nothing_before_it_arrives() -> None:
    chains = _chains(300, seed=5)
    base = make_trace(*chains)
    planted = Trace("p", base.requests + (TraceRequest(
        base.requests[-1].timestamp_ms + 10_000, 512, 1, tuple(chains[0])),))
    a = simulate(base, "h", learned_factory(20, seed=0), 20,
                 hints=TraceHints(base, queue=32))
    b = simulate(planted, "h", learned_factory(20, seed=0), 20,
                 hints=TraceHints(planted, queue=32))
    assert b.request_prefix_hits[:-1] == a.request_prefix_hits


def test_hinted_replay_is_stable_for_a_seed() -> None:
    trace = make_trace(*_chains(400, seed=2))
    a = run_policy(trace, "learned+hints", 30, seed=4)
    b = run_policy(trace, "learned+hints", 30, seed=4)
    assert a.request_prefix_hits == b.request_prefix_hits


def test_synthetic_trace_is_stable_and_learned_is_not_below_lru_on_it() -> None:
    trace = synthetic_trace(2500, seed=1)
    assert trace == synthetic_trace(2500, seed=1)
    assert all(len(set(r.blocks)) == len(r.blocks) for r in trace.requests)
    cap = max(1, trace.distinct_blocks() // 50)
    lru = run_policy(trace, "lru", cap)
    learned = run_policy(trace, "learned", cap)
    assert learned.prefix_hit_ratio >= lru.prefix_hit_ratio
