"""Run one named policy over a trace in the simulator (what ``kvtier replay`` calls).

Simulation names are the live policies plus ``belady`` (the offline bound, report-only). The
learned policy in tier mode uses one model for the whole stack: the top tier's core learns and
duels against LRU, the lower tiers rank by the same reuse densities and follow its mode.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvtier.errors import InvalidArgument
from kvtier.lab.replay import SIM_POLICIES
from kvtier.policy.chain import PrefixCore
from kvtier.policy.classic import ARCCore, LFUCore, LRUCore, S3FIFOCore
from kvtier.policy.core import ReplacementCore
from kvtier.policy.learned.density import ReuseDensity
from kvtier.policy.learned.model import HORIZON_PER_SLOT, DensityPrefixCore, LearnedCore
from kvtier.lab.replay.hints import TraceHints
from kvtier.lab.replay.sim import CoreFactory, Progress, SimResult, simulate, simulate_belady
from kvtier.lab.replay.trace import Trace

BASELINES: dict[str, type[ReplacementCore]] = {
    "lru": LRUCore, "lfu": LFUCore, "arc": ARCCore, "s3fifo": S3FIFOCore,
    "chain-lru": PrefixCore,
}

HINTED = "learned+hints"
"""The learned policy told the worker's queue (look-ahead ``queue``) and session hints."""


def learned_factory(total_slots: int, *, seed: int) -> CoreFactory:
    """Cores sharing one model: the first one built leads, the others follow."""
    model = ReuseDensity(max(4096, HORIZON_PER_SLOT * total_slots))
    leader: list[LearnedCore] = []

    def make(slots: int) -> ReplacementCore:
        if not leader:
            leader.append(LearnedCore(slots, model, seed=seed))
            return leader[0]
        follower = DensityPrefixCore(slots, model, seed=seed + len(leader))
        follower.leader = leader[0]
        leader[0].hands_down = True
        return follower

    return make


def run_policy(trace: Trace, policy: str, capacity: int, *,
               tiers: Sequence[tuple[str, int]] | None = None, seed: int = 0,
               device: str = "cpu", progress: Progress | None = None,
               queue: int = 32) -> SimResult:
    """Replay ``trace`` with ``policy`` at ``capacity`` slots (split over ``tiers`` if given).

    ``learned+hints`` is the learned policy hearing the hints of
    :class:`~kvtier.lab.replay.hints.TraceHints` (a queue of ``queue`` requests, sessions).
    ``device`` is accepted for callers but unused: the simulated learned policy decides by the
    reuse density, which needs no torch (the live policy's predictor takes its own device).
    """
    if policy == "belady":
        return simulate_belady(trace, capacity, progress=progress)
    if policy == HINTED:
        return simulate(trace, policy, learned_factory(capacity, seed=seed), capacity,
                        tiers=tiers, progress=progress,
                        hints=TraceHints(trace, queue=queue, sessions=True))
    if policy == "learned":
        factory = learned_factory(capacity, seed=seed)
    elif policy in BASELINES:
        factory = BASELINES[policy]
    else:
        raise InvalidArgument(f"unknown policy {policy!r}; known: {', '.join(SIM_POLICIES)}",
                              field="policy")
    return simulate(trace, policy, factory, capacity, tiers=tiers, progress=progress)
