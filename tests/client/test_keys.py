"""prefix_keys: chained prefix hashes, equal prefixes give equal keys."""

from __future__ import annotations

import hashlib

import pytest

from kvtier_client import prefix_keys
from kvtier_client.keys import root_key


def test_equal_prefixes_share_keys_and_divergence_changes_the_rest() -> None:
    a = prefix_keys(list(range(64)), 16, "t")
    b = prefix_keys(list(range(32)) + [999] + list(range(33, 64)), 16, "t")
    assert len(a) == 4 and len(set(a)) == 4
    assert a[:2] == b[:2] and a[2] != b[2] and a[3] != b[3]  # chained: later pages differ too


def test_key_is_blake2b_of_parent_and_tokens() -> None:
    keys = prefix_keys([1, 2, 3, 4], 2, "ns")
    parent = root_key("ns")
    for i, key in enumerate(keys):
        tokens = [1, 2, 3, 4][2 * i:2 * i + 2]
        parent = hashlib.blake2b(parent + b"".join(t.to_bytes(4, "little") for t in tokens),
                                 digest_size=16, person=b"kvtier-page").digest()
        assert key == parent


def test_namespaces_and_partial_pages() -> None:
    assert prefix_keys([1, 2, 3], 2, "a") != prefix_keys([1, 2, 3], 2, "b")
    assert len(prefix_keys([1, 2, 3], 2, "a")) == 1  # the trailing partial page has no key
    assert prefix_keys([], 4, "a") == []
    with pytest.raises(ValueError, match="page_tokens"):
        prefix_keys([1], 0, "a")
    with pytest.raises(ValueError, match="token ids"):
        prefix_keys([-1], 1, "a")
