"""Chained prefix-hash page keys: equal token prefixes give equal keys, across workers.

``key[i] = blake2b(key[i-1] || token_ids of page i)``, with ``key[-1]`` derived from the
namespace, so a page's key names its whole prefix (not just its own tokens) and two tenants never
share keys. Token ids are hashed as little-endian uint32 (wide enough for every vocabulary).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

KEY_BYTES = 16


def root_key(namespace: str) -> bytes:
    """The parent of the first page of every sequence in ``namespace``."""
    return hashlib.blake2b(namespace.encode(), digest_size=KEY_BYTES,
                           person=b"kvtier-root").digest()


def prefix_keys(token_ids: Sequence[int], page_tokens: int, namespace: str) -> list[bytes]:
    """Keys of the full pages of ``token_ids``, ``page_tokens`` tokens each.

    A trailing partial page gets no key (its KV is not a finished chunk). Raises ValueError for
    ``page_tokens < 1`` or token ids outside uint32.
    """
    if page_tokens < 1:
        raise ValueError(f"page_tokens must be >= 1, got {page_tokens}")
    parent = root_key(namespace)
    keys = []
    for start in range(0, len(token_ids) - page_tokens + 1, page_tokens):
        chunk = token_ids[start:start + page_tokens]
        try:
            packed = struct.pack(f"<{len(chunk)}I", *chunk)
        except struct.error:
            raise ValueError("token ids must be integers in 0..2**32-1") from None
        parent = hashlib.blake2b(parent + packed, digest_size=KEY_BYTES,
                                 person=b"kvtier-page").digest()
        keys.append(parent)
    return keys
