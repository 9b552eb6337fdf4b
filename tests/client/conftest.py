"""A real daemon on port 0 for client tests (memory tiers only, no HTTP)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvtier.config import Settings
from kvtier.daemon import Daemon


@pytest.fixture()
def daemon() -> Iterator[Daemon]:
    d = Daemon(Settings(grpc_port=0)).start()
    yield d
    d.stop(grace_s=0.5)
