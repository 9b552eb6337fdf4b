"""kvtier_client: what an inference worker imports to talk to a kvtier daemon.

Importing it pulls in neither torch nor fastapi nor the server package ``kvtier``.

    from kvtier_client import KVTierClient, Page, prefix_keys
    with KVTierClient("127.0.0.1:50051", namespace="tenant-a") as c:
        keys = prefix_keys(token_ids, page_tokens=16, namespace="tenant-a")
        c.put(keys, [Page(k, v, start_position=16 * i) for i, (k, v) in enumerate(kv)])
        pages = c.get(keys)        # FetchedPage or None (a miss) per key
"""

from kvtier_client.aio import AsyncKVTierClient
from kvtier_client.client import KVTierClient
from kvtier_client.core import CacheStats, LookupResult, TierStats
from kvtier_client.errors import (
    AbortedError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    KVTierClientError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from kvtier_client.keys import prefix_keys
from kvtier_client.tensors import FetchedPage, Page, RawTensor

__all__ = [
    "AbortedError", "AsyncKVTierClient", "CacheStats", "DeadlineExceededError",
    "FailedPreconditionError", "FetchedPage", "InternalError", "InvalidArgumentError",
    "KVTierClient", "KVTierClientError", "LookupResult", "NotFoundError", "Page",
    "PermissionDeniedError", "RawTensor", "ResourceExhaustedError", "TierStats",
    "UnauthenticatedError", "UnavailableError", "prefix_keys",
]
