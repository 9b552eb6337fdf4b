"""Fixtures for the store tests: stores that always get closed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvtier.config import Settings
from kvtier.store.policy import Policy
from kvtier.store.store import TierStore

from .helpers import StoreFactory


@pytest.fixture()
def make_store() -> Iterator[StoreFactory]:
    """``make_store(settings, policy=None, start=False)``; every store is closed at teardown."""
    stores: list[TierStore] = []

    def factory(settings: Settings, policy: Policy | None = None, start: bool = False,
                mover: bool = True) -> TierStore:
        store = TierStore(settings, policy)
        stores.append(store)
        if start:
            store.start(mover=mover)
        return store

    yield factory
    for s in stores:
        s.close()
