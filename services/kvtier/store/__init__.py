"""The tiered page store: page index, tiers, moves, the mover, the policy interface.

Public entry point: :class:`kvtier.store.store.TierStore`. Inside the package, metadata is kept
apart from bytes::

    store.py         TierStore: validation, batching, access events, results (the API)
    placement.py     where a put goes (policy admission) and the put itself
    engine.py        TierEngine: the index lock, make-room, eviction, reads, deletes
    moves.py         moving a page between tiers (prepare -> copy -> commit)
    mover.py         the background thread and the watermark pass per tier
    remote_index.py  keeping the index of the shared Redis tier in step (discover, resync)
    index.py         PageIndex: pure-Python metadata and byte accounting, explicit page states
    tiers.py         tier specs/limits, the in-memory byte holder, stored-form conversion
    redis_tier.py    the Redis backend (one hash per page, up/down state, probe)
    policy.py        the Policy interface and LRU/LFU
    buffers.py       the pool of host buffers that put copies write into
    stats.py, results.py, access_log.py   value objects and small holders

Only ``tiers.py`` calls the codecs (and ``TierStore.start`` their warmup); only
``redis_tier.py`` talks to Redis.
"""
