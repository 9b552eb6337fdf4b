"""Placing new pages: which tier a put goes to (policy admission) and the put itself.

A put goes to the first memory tier the policy admits it into (default: the hot tier; never
straight to Redis), is copied or encoded outside the index lock, and is made visible with one
commit. If the tier is at its hard capacity, room is made synchronously by pushing the tier's
own victims down — a put does not fail while lower tiers have room. A page larger than the
whole tier is CapacityExhausted.
"""

from __future__ import annotations

import logging
import time

from kvtier.errors import CapacityExhausted, Conflict
from kvtier.store.engine import TierEngine
from kvtier.store.policy import PageMeta
from kvtier.store.tiers import Stored, adoptable, own_copy, stored_size
from kvtier.types import Medium, Page, PageId, Precision

log = logging.getLogger(__name__)


def choose_tier(engine: TierEngine, pid: PageId, page: Page, chain: int) -> int:
    """The first memory tier the policy admits a new page into (the last one otherwise)."""
    e = engine
    memory_tiers = [i for i, spec in enumerate(e.specs) if spec.medium is not Medium.REDIS]
    for i in memory_tiers[:-1]:
        meta = PageMeta(pid, e.names[i], i, page.nbytes, 0, 0, time.time(), 0, chain)
        try:
            if e.policy.admit(meta, e.names[i]):
                return i
        except Exception:
            log.exception("policy %s failed in admit(); admitting", e.policy.name)
            return i
    return memory_tiers[-1]


def check_fits(engine: TierEngine, page: Page, tier: int) -> None:
    """CapacityExhausted if ``page`` is larger than the whole tensor tier ``tier``."""
    spec, cap = engine.specs[tier], engine.limits[tier].capacity_bytes
    if spec.holds_tensors and page.nbytes > cap:
        raise CapacityExhausted(
            f"page is {page.nbytes} bytes, larger than the whole {spec.name!r} tier "
            f"({cap} bytes)", field="page")


def place(engine: TierEngine, pid: PageId, page: Page, tier: int, chain_position: int,
          now: float, owned: bool = False) -> bool:
    """Store a new page in ``tier``; False if the key exists. Makes room synchronously.
    ``owned``: nobody else holds the page's memory, so a tier on its device adopts it.

    Raises CapacityExhausted if the page can never fit the tier, or room could not be made
    within ``room_timeout_s``.
    """
    spec, cap = engine.specs[tier], engine.limits[tier].capacity_bytes
    backend = engine.memory[tier]
    if backend is None:
        raise Conflict(f"pages are placed in memory tiers, not in {spec.name!r}", field="tier")
    check_fits(engine, page, tier)
    with engine.cond:
        version = engine.index.begin_place(pid, tier, page.nbytes, chain_position, now)
    if version is None:
        return False
    size = 0
    reserved = False
    try:
        data: Stored
        if spec.device is not None:
            if engine.transfer is not None and engine.transfer.tier == tier:
                data = engine.transfer.admit(page)  # a copy in the device pool
            else:
                data = page if owned and adoptable(page, spec.device) else \
                    own_copy(page, spec.device)
            prec = Precision.FULL
        else:
            data, prec = engine.converter.to_tier(page, spec)
        size = stored_size(data)
        if size > cap:
            raise CapacityExhausted(
                f"page is {size} bytes stored, larger than the whole {spec.name!r} tier "
                f"({cap} bytes)", field="page")
        if not engine.reserve(tier, size):
            raise CapacityExhausted(
                f"could not make {size} bytes of room in tier {spec.name!r} within "
                f"{engine.room_timeout_s} s", field="page")
        reserved = True
        with engine.cond:
            ok = engine.index.commit_place(pid, version, size, prec)
            if ok:
                backend.put(pid, data)
            else:
                engine.index.release(tier, size)
            engine.cond.notify_all()
        return True
    except BaseException:
        with engine.cond:
            if reserved:
                engine.index.release(tier, size)
            engine.index.abort_place(pid, version)
            engine.cond.notify_all()
        raise
