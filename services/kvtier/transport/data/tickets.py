"""One-time tickets that bind a data-channel connection to a namespace and its rights.

``OpenData`` (a gRPC call, so authenticated and checked like any other) issues a ticket; the
first frame of a data connection presents it. A ticket is 32 random bytes, valid once and
for ``ttl_s`` seconds. Only a digest of it is kept, so the book's memory never holds a ticket
that could still be presented.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import dataclass

from kvtier.types import Namespace
from kvtier_client.data_frame import TICKET_BYTES

MAX_OPEN_TICKETS = 65536  # issued and not yet presented; the oldest go first beyond


@dataclass(frozen=True, slots=True)
class Grant:
    """What a presented ticket allows its connection."""

    namespace: Namespace
    writable: bool
    # the bearer token the ticket was opened with (None: the daemon takes no tokens); each
    # frame checks it again, so a revoked token or grant stops its connections too
    token: str | None = None


class TicketBook:
    """Tickets issued and not yet presented (thread-safe)."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._open: dict[bytes, tuple[float, Grant]] = {}  # digest -> (expiry, grant)

    def issue(self, namespace: Namespace, writable: bool, token: str | None = None) -> bytes:
        ticket = secrets.token_bytes(TICKET_BYTES)
        now = time.monotonic()
        with self._lock:
            self._prune(now)
            while len(self._open) >= MAX_OPEN_TICKETS:
                del self._open[next(iter(self._open))]
            self._open[_digest(ticket)] = (now + self.ttl_s, Grant(namespace, writable, token))
        return ticket

    def redeem(self, ticket: bytes) -> Grant | None:
        """The grant of ``ticket``, once; None if unknown, used or expired."""
        if len(ticket) != TICKET_BYTES:
            return None
        with self._lock:
            entry = self._open.pop(_digest(ticket), None)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def _prune(self, now: float) -> None:
        expired = [d for d, (exp, _) in self._open.items() if exp < now]
        for d in expired:
            del self._open[d]

    def __len__(self) -> int:
        with self._lock:
            return len(self._open)


def _digest(ticket: bytes) -> bytes:
    return hashlib.sha256(ticket).digest()
