"""Moving a page between tiers: prepare, copy, commit.

The three steps and the lock held in each are in :mod:`kvtier.store.engine`'s docstring. A move
never fails half-way: it either commits (the page is in the target tier, the source's memory
is released; a Redis copy stays, as the shared tier keeps what it has) or leaves the page where
it was (``_abort``), unless the source's bytes turned out to be gone or corrupt, when the page
leaves the cache (``_drop``) and is never served.
"""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

from kvtier.errors import BackendUnavailable, CorruptPage
from kvtier.store.index import MoveTicket
from kvtier.store.redis_tier import RemoteMeta
from kvtier.store.tiers import Stored, blob_of, stored_size
from kvtier.types import EvictionReason, PageId, Precision

if TYPE_CHECKING:
    from kvtier.store.engine import TierEngine


class MoveResult(enum.Enum):
    MOVED = "moved"
    BUSY = "busy"  # absent from the index, mid-move, or already in the target tier
    GONE = "gone"  # vanished from its backend (deleted elsewhere, corrupt): dropped
    NO_ROOM = "no_room"
    TOO_BIG = "too_big"  # larger than the whole target tier
    DOWN = "down"  # Redis was needed and is down


def move(e: TierEngine, pid: PageId, dst: int) -> MoveResult:
    """Move one page to tier ``dst`` (up or down): prepare, copy, commit."""
    with e.cond:
        ticket = e.index.begin_move(pid, dst)
        if ticket is None:
            return MoveResult.BUSY
        src_backend = e.memory[ticket.src]
        data: Stored | None = src_backend.get(pid) if src_backend is not None else None
        rec = e.index.get(pid)
        nbytes = rec.nbytes if rec is not None else 0
        chain = rec.chain_position if rec is not None else 0
        precision = rec.precision if rec is not None else Precision.FULL
        src_token = rec.remote_token if rec is not None else None
    size = 0
    reserved = False
    token: str | None = None
    try:
        if not e.tier_up(dst):
            raise BackendUnavailable("redis tier is down", field="redis")
        if data is None:
            got = e.redis_or_raise().read(pid)
            if got is None:
                _drop(e, ticket, None)
                return MoveResult.GONE
            data = got[0]
        try:
            new, prec = e.converter.to_tier(data, e.specs[dst])
        except CorruptPage:  # includes NonFinitePage: a lent page its client changed
            if _drop(e, ticket, EvictionReason.CORRUPT) and src_token is not None:
                e.redis_delete_quietly([(pid, src_token)])
            return MoveResult.GONE
        size = stored_size(new)
        if size > e.limits[dst].capacity_bytes:
            _abort(e, ticket, 0)
            return MoveResult.TOO_BIG
        if not e.reserve(dst, size):
            _abort(e, ticket, 0)
            return MoveResult.NO_ROOM
        reserved = True
        if dst == e.redis_tier:
            token = e.redis_or_raise().write(
                pid, blob_of(new), RemoteMeta(min(precision, prec), nbytes, size, chain))
    except BackendUnavailable:
        _abort(e, ticket, size if reserved else 0)
        return MoveResult.DOWN
    except BaseException:
        _abort(e, ticket, size if reserved else 0)
        raise
    with e.cond:
        ok = e.index.commit_move(ticket, size, prec, token)
        if ok:
            dst_backend = e.memory[dst]
            if dst_backend is not None:
                dst_backend.put(pid, new)
            if src_backend is not None:
                src_backend.pop(pid)
            if dst > ticket.src:
                e.counters[ticket.src].demotions += 1
            else:
                e.counters[dst].promotions += 1
                # a promotion announces a use: stamp it now, or the page would be the
                # freshest victim of the very make-room that follows
                e.index.touch(pid, time.time(), count=False)
        else:
            e.index.release(dst, size)
        e.cond.notify_all()
    # a page promoted out of the Redis tier leaves its copy there: the shared tier is a cache
    # of its own, and other daemons read it (kvtier.store.remote_index)
    if not ok and token is not None:
        e.redis_delete_quietly([(pid, token)])  # the page was deleted meanwhile
    return MoveResult.MOVED if ok else MoveResult.GONE


def _abort(e: TierEngine, ticket: MoveTicket, size: int) -> None:
    with e.cond:
        if size:
            e.index.release(ticket.dst, size)
        e.index.abort_move(ticket)
        e.cond.notify_all()


def _drop(e: TierEngine, ticket: MoveTicket, reason: EvictionReason | None) -> bool:
    """The source bytes are gone or corrupt: the page leaves the cache (never served)."""
    with e.cond:
        rec = e.index.get(ticket.page)
        if rec is None or rec.version != ticket.version:
            return False
        e.index.remove(ticket.page)
        backend = e.memory[ticket.src]
        if backend is not None:
            backend.pop(ticket.page)
        if reason is not None:
            e.counters[ticket.src].evictions[reason.value] += 1
        e.cond.notify_all()
    e.forget([ticket.page])
    return True
