"""The policy interface the store consults, and the two built-in fallbacks (LRU, LFU).

The store keeps the metadata (:class:`PageMeta`) and asks a :class:`Policy` three questions:
which candidates to demote or evict (:meth:`Policy.victims`), whether to admit a page into a
tier (:meth:`Policy.admit`), and which pages to prefetch (:meth:`Policy.prefetch`). It reports
every access with :meth:`Policy.record`, which must never block. Policies are pure Python over
keys and numbers, testable without tensors. The learned predictor (``kvtier.policy``) is one
more implementation; plugging it in does not touch the store.

Times are a logical clock: the store stamps each access with a strictly increasing sequence
number (``seq``) as well as wall time, so LRU order is exact even when two accesses share a
timestamp.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from kvtier.types import PageId


class AccessKind(str, enum.Enum):
    PUT = "put"
    GET = "get"
    LOOKUP = "lookup"
    PROMOTE = "promote"


@dataclass(frozen=True, slots=True)
class AccessEvent:
    """One access, as the daemon reports it to the policy (batched, off the data path)."""

    page: PageId
    seq: int
    time: float  # wall clock, seconds
    kind: AccessKind
    tier_hit: str | None  # tier that served it; None for a miss
    nbytes: int
    chain_position: int  # index of the page in the key chain of its request (0 = first)
    attention_mass: float | None = None


@dataclass(frozen=True, slots=True)
class PageMeta:
    """What a policy may see of a resident page."""

    page: PageId
    tier: str
    tier_index: int  # 0 = hottest
    nbytes: int
    created_seq: int
    last_seq: int
    last_time: float
    access_count: int
    chain_position: int
    attention_mass: float | None = None


@dataclass(frozen=True, slots=True)
class PolicyStatus:
    name: str  # the configured policy
    active: str  # the policy actually deciding now (differs while falling back)
    fallback_active: bool
    detail: str = ""
    loss: float | None = None  # recent training loss of a learned policy
    online_accuracy: float | None = None  # share of recent predictions the future confirmed
    events_dropped: int = 0  # access events lost on the way to the policy (full queue, outage)


class Policy(abc.ABC):
    """Scores pages for keeping. Higher score = more worth keeping in a fast tier."""

    name: ClassVar[str]

    @abc.abstractmethod
    def score(self, pages: Sequence[PageMeta]) -> list[float]:
        """One score per page, higher = keep. Must be cheap: called by the mover."""

    def record(self, events: Sequence[AccessEvent]) -> None:  # noqa: B027 - optional hook
        """Learn from accesses. Must not block the caller."""

    def forget(self, pages: Sequence[PageId]) -> None:  # noqa: B027 - optional hook
        """These pages left the cache entirely (deleted or evicted from the last tier)."""

    def victims(self, candidates: Sequence[PageMeta], n: int) -> list[PageId]:
        """The ``n`` candidates to move down first: lowest score, ties by oldest access."""
        if n <= 0 or not candidates:
            return []
        scores = self.score(candidates)
        order = sorted(
            range(len(candidates)),
            key=lambda i: (scores[i], candidates[i].last_seq, candidates[i].page),
        )
        return [candidates[i].page for i in order[:n]]

    def admit(self, page: PageMeta, tier: str) -> bool:
        """Whether a page arriving in ``tier`` should stay there (True) or go lower."""
        return True

    def prefetch(self, limit: int) -> list[PageId]:
        """Pages worth promoting ahead of use, best first. Default: none."""
        return []

    def status(self) -> PolicyStatus:
        return PolicyStatus(name=self.name, active=self.name, fallback_active=False)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the policy owns (a remote policy's channel and sender thread)."""


class LRUPolicy(Policy):
    """Least recently used goes first."""

    name = "lru"

    def score(self, pages: Sequence[PageMeta]) -> list[float]:
        return [float(p.last_seq) for p in pages]


class LFUPolicy(Policy):
    """Least frequently used goes first; ties go to the least recently used."""

    name = "lfu"

    def score(self, pages: Sequence[PageMeta]) -> list[float]:
        return [float(p.access_count) for p in pages]
