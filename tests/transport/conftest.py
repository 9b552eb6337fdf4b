"""A real daemon (TierStore + gRPC server on port 0) and clients, for transport tests."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from kvtier.config import MiB, Settings, TierConfig
from kvtier.daemon import Daemon
from kvtier.types import Codec, Medium
from kvtier_client import KVTierClient, Page

PAGE_SHAPE = (2, 16, 2, 64)  # float16: 8 KiB per tensor, 16 KiB per page


def make_kv(seed: int, shape: tuple[int, ...] = PAGE_SHAPE,
            dtype: Any = np.float16) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape).astype(dtype), rng.standard_normal(shape).astype(dtype))


def wait_for(cond: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    """True once ``cond()`` holds, False if it still does not after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def make_page(seed: int, start_position: int = 0, **kw: Any) -> Page:
    k, v = make_kv(seed, **kw)
    return Page(k, v, start_position)


def tiny_tiers(with_redis: bool, hot_room: bool = False) -> list[TierConfig]:
    """Room for about 2 pages per memory tier, so a handful of puts reaches every tier.

    ``hot_room``: the hot tier holds 4 pages but the mover keeps it at 1 or 2, leaving room
    for promotions. Its low watermark (1.8 pages) holds one page promoted from warm (about
    1.7 pages: the decoded page and the int8 blob it came from), or the mover would push that
    page straight back down.
    """
    page = 2 * 8 * 1024
    hot = (TierConfig(name="hot", medium=Medium.DEVICE, codec=Codec.NONE,
                      capacity_bytes=4 * page, high_watermark=0.5, low_watermark=0.45)
           if hot_room else
           TierConfig(name="hot", medium=Medium.DEVICE, codec=Codec.NONE,
                      capacity_bytes=2 * page))
    tiers = [
        hot,
        TierConfig(name="warm", medium=Medium.HOST, codec=Codec.INT8, capacity_bytes=page),
        TierConfig(name="cold", medium=Medium.HOST, codec=Codec.INT4, capacity_bytes=page),
    ]
    if with_redis:
        tiers.append(TierConfig(name="remote", medium=Medium.REDIS, codec=Codec.INT4,
                                capacity_bytes=64 * MiB))
    return tiers


DaemonFactory = Callable[..., Daemon]


@pytest.fixture()
def make_daemon() -> Iterator[DaemonFactory]:
    """Start daemons on port 0 (no HTTP); all are stopped at teardown."""
    started: list[Daemon] = []

    def factory(**overrides: Any) -> Daemon:
        overrides.setdefault("grpc_port", 0)
        overrides.setdefault("mover_interval_s", 0.01)
        d = Daemon(Settings(**overrides)).start()
        started.append(d)
        return d

    yield factory
    for d in started:
        d.stop(grace_s=0.5)


@pytest.fixture()
def daemon(make_daemon: DaemonFactory) -> Daemon:
    return make_daemon()


@pytest.fixture(params=["inline", "shm", "data"])
def client(request: pytest.FixtureRequest, daemon: Daemon) -> Iterator[KVTierClient]:
    """A client of ``daemon`` over each transport path: page bytes in gRPC streams, in
    shared memory, on the data channel."""
    c = KVTierClient(daemon.grpc_address, "tenant-a", timeout_s=20,
                     shared_memory=request.param == "shm", shm_bytes=8 * MiB,
                     data_channel=request.param == "data")
    yield c
    c.close()
