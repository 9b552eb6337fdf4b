"""Small builders for the cluster tests: stores over a cluster, pages, the int4 bound."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from kvtier.config import RedisConfig, Settings, TierConfig
from kvtier.types import Codec, Medium, Page

SHAPE = (1, 8, 1, 8)
PAGE_BYTES = 2 * 8 * 8 * 2
NS = "tenant-c"


def make_page(seed: int) -> Page:
    g = torch.Generator().manual_seed(seed)
    return Page(k=torch.randn(SHAPE, generator=g).half(), v=torch.randn(SHAPE, generator=g).half(),
                start_position=64)


def key(i: int) -> bytes:
    return b"page-%04d" % i


def int4_close(got: torch.Tensor, want: torch.Tensor) -> bool:
    span = float(want.float().max() - want.float().min())
    return bool(((got.float() - want.float()).abs() <= span / 15 * 0.51 + 1e-2).all())


def settings(url: str, *, hot_pages: int = 64, remote_pages: int = 4096,
             **redis: Any) -> Settings:
    tiers = [
        TierConfig(name="hot", medium=Medium.DEVICE, codec=Codec.NONE,
                   capacity_bytes=hot_pages * PAGE_BYTES, high_watermark=1.0, low_watermark=0.5),
        TierConfig(name="remote", medium=Medium.REDIS, codec=Codec.INT4,
                   capacity_bytes=remote_pages * PAGE_BYTES),
    ]
    cfg = RedisConfig(url=url, prefix="kvc", socket_timeout_s=0.3, connect_timeout_s=0.3,
                      retry_interval_s=0.1, **redis)
    return Settings(tiers=tiers, redis=cfg, device="cpu", mover_interval_s=0.01)


def wait_until(cond: Callable[[], bool], timeout_s: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        time.sleep(0.02)
