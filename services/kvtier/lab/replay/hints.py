"""Worker hints derived from a trace, honestly: only what a serving system knows at the time.

Mooncake traces carry no session ids and no scheduler queue, so replay derives them, and each
hint may know exactly this much when request i (arrival ``t_i``) is about to be served:

- **queue** (look-ahead ``k``): the chains of the next requests in arrival order that have
  *already arrived* (``t_j <= t_i``), at most ``k`` of them. A request never appears in the
  queue before its timestamp. Requests replay at their arrival times with no queueing delay,
  so the queue holds what arrived in the same instant (the conversation trace stamps arrivals
  in about 3-second steps).
- **session**: request i continues the session of the latest earlier request whose chain,
  all but its last (partial, re-hashed) block, is a prefix of i's chain, known only once both
  arrived; otherwise i starts a new session. Ids are numbered in order of first appearance.
- **session ended**: never sent. The trace does not say when a conversation is closed, and
  inferring it from later requests would be the future; a serving system that knows it (a
  closed chat, a finished agent run) sends it through the same call.
- **expected reuse time**: never sent (the trace has no tool calls).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from kvtier.errors import InvalidArgument
from kvtier.lab.replay.trace import Trace


@dataclass(frozen=True, slots=True)
class Hints:
    """What the worker tells the cache before request i is served."""

    queue: tuple[tuple[int, ...], ...]
    session: int | None
    ended: tuple[Hashable, ...] = ()


class TraceHints:
    """Per-request hints of a trace (see the module docstring); ask in request order."""

    def __init__(self, trace: Trace, *, queue: int = 32, sessions: bool = True) -> None:
        if queue < 0:
            raise InvalidArgument(f"must be >= 0, got {queue}", field="queue")
        self.trace = trace
        self.k = queue
        self.sessions = sessions
        self._tails: dict[int, int] = {}  # last full block of a request's chain -> session
        self._next_session = 0
        self._asked = -1

    def at(self, i: int) -> Hints:
        """Hints before request ``i``; requests must be asked in order (no peeking back)."""
        if i != self._asked + 1:
            raise InvalidArgument(f"hints are derived in request order: asked for {i} after "
                                  f"{self._asked}", field="request")
        self._asked = i
        reqs = self.trace.requests
        now = reqs[i].timestamp_ms
        queue: list[tuple[int, ...]] = []
        j = i + 1
        while j < len(reqs) and len(queue) < self.k and reqs[j].timestamp_ms <= now:
            queue.append(reqs[j].blocks)
            j += 1
        return Hints(tuple(queue), self._session(reqs[i].blocks) if self.sessions else None)

    def _session(self, blocks: Sequence[int]) -> int:
        tails = self._tails
        found = None
        for b in reversed(blocks[1:]):  # the root alone (a shared system prompt) says nothing
            s = tails.get(b)
            if s is not None:
                found = s
                break
        if found is None:
            found = self._next_session
            self._next_session += 1
        if len(blocks) >= 2:
            tails[blocks[-2]] = found
        return found
