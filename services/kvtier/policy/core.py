"""The replacement core: one cache model that both the simulator and the live policy drive.

A core owns the ordering state of a policy (queues, ghosts, frequencies, predictions) over
opaque hashable keys. The simulator gives it a capacity in slots and lets it decide everything
(admission, eviction). Behind the store's :class:`~kvtier.store.policy.Policy` interface
(:mod:`kvtier.policy.adapter`) the store owns residency and capacity, and the core only ranks the
candidates it is shown: :meth:`ReplacementCore.evict_order` is the same preference the core
uses when it evicts on its own, so a policy behaves alike in replay and in the daemon.

Contract of the simulator loop, per key of a request (after :meth:`begin_request`)::

    if key in core:   core.hit(key)                       # a hit
    elif core.admit(key): evicted = core.insert(key)       # a miss, cached
    else:             pass                                 # a miss, bypassed
"""

from __future__ import annotations

import abc
from collections.abc import Hashable, Iterable, Sequence
from typing import ClassVar

from kvtier.errors import InvalidArgument

Key = Hashable


class ReplacementCore(abc.ABC):
    """Ordering state of one policy over at most ``capacity`` resident keys."""

    name: ClassVar[str]

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise InvalidArgument(f"must be at least 1 slot, got {capacity}", field="capacity")
        self.capacity = capacity

    @abc.abstractmethod
    def __contains__(self, key: Key) -> bool:
        """Whether ``key`` is resident."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of resident keys."""

    def begin_request(self, keys: Sequence[Key], now_s: float) -> None:  # noqa: B027
        """A request for the chain ``keys`` (block 0 first) arrives at wall time ``now_s``.

        Called before the per-key calls for that request, so a core may work on the whole
        chain at once (the learned core batches its inference here). Nothing after the
        request is visible: this is the present, not look-ahead.
        """

    def hint_queue(self, chains: Sequence[Sequence[Key]]) -> None:  # noqa: B027
        """The chains of the requests waiting to be scheduled now (a worker's queue hint),
        replacing the previous hint. Default: ignored."""

    def hint_session(self, session: Hashable | None,  # noqa: B027
                     ended: Sequence[Hashable] = ()) -> None:
        """The next :meth:`begin_request` belongs to ``session`` (None: unknown); ``ended``
        sessions will send nothing more. Default: ignored."""

    @abc.abstractmethod
    def hit(self, key: Key) -> None:
        """A resident key was accessed."""

    def admit(self, key: Key) -> bool:
        """On a miss: whether to cache ``key`` (False = bypass). Default: always."""
        return True

    @abc.abstractmethod
    def insert(self, key: Key) -> list[Key]:
        """Make a missing key resident; returns the keys evicted to make room."""

    @abc.abstractmethod
    def remove(self, key: Key) -> None:
        """The key left the cache by an outside decision (the store evicted or deleted it)."""

    @abc.abstractmethod
    def evict_key(self, key: Key) -> tuple[float, ...]:
        """Sort key of a resident key: lower leaves first. Unknown keys sort first."""

    def evict_order(self, keys: Iterable[Key]) -> list[Key]:
        """``keys`` in the order this core would evict them."""
        return sorted(keys, key=self.evict_key)

    def keep_score(self, key: Key) -> float:
        """One number per key for the store's ``score`` (higher = keep)."""
        return float(self.evict_key(key)[0])
