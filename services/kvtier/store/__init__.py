"""The tiered page store: page index, tiers, transfers, the mover, the policy interface.

Public entry point: :class:`kvtier.store.store.TierStore`. A put, its demotions and a get go
through five modules, top to bottom; metadata is kept apart from bytes::

    store.py         TierStore: validation, batching, access events, results (the API)
    engine.py        TierEngine: the one owner of the state and its lock; transactions
                     (begin/commit/abort of place and move, evict, read, delete, reserve, stats)
    transfer.py      placing, moving, reading, deleting: the copies, encodes and Redis round
                     trips between two transactions, never under the lock
    mover.py         when pages move: the background thread, the watermark and prefetch rules
    tiers.py         tier specs and limits, the in-memory byte holder, stored-form conversion

Beside them: ``index.py`` (PageIndex: pure-Python metadata and byte accounting, explicit page
states), ``redis_tier.py`` (the Redis backend), ``remote_index.py`` (keeping the index of the
shared Redis tier in step), ``policy.py`` (the Policy interface and LRU/LFU), ``buffers.py``
(the pool of host buffers that put copies write into), the device tier's memory
(``device_pool.py``: one preallocated buffer; ``device_transfer.py``: the compressed moves into
and out of it; ``device_leases.py``: CUDA IPC leases on its blocks), and value objects
(``stats.py``, ``results.py``, ``access_log.py``).

Only ``tiers.py`` and ``device_transfer.py`` call the codecs (and ``TierStore.start`` their
warmup); only ``redis_tier.py`` talks to Redis; only ``engine.py`` takes the store's lock.
"""
