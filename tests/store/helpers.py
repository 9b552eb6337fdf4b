"""Small builders for the store tests: tiny tiers, tiny pages, wait-until with a timeout."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from kvtier.config import CodecConfig, RedisConfig, Settings, TierConfig
from kvtier.store.store import TierStore
from kvtier.types import Codec, Medium, Page

SHAPE = (1, 8, 1, 8)  # [layers, tokens, kv_heads, head_dim]: 256 bytes of k+v in fp16
PAGE_BYTES = 2 * 8 * 8 * 2


def make_page(seed: int, shape: tuple[int, int, int, int] = SHAPE,
              dtype: torch.dtype = torch.float16, start_position: int = 64) -> Page:
    """A deterministic page; start_position >= 4 so no attention-sink tokens by default."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(shape, generator=g).to(dtype)
    v = torch.randn(shape, generator=g).to(dtype)
    return Page(k=k, v=v, start_position=start_position)


def key(i: int) -> bytes:
    return b"page-%04d" % i


def tier(name: str, medium: Medium, codec: Codec, capacity: int, high: float = 1.0,
         low: float = 0.5) -> TierConfig:
    return TierConfig(name=name, medium=medium, codec=codec, capacity_bytes=capacity,
                      high_watermark=high, low_watermark=low)


def make_settings(tiers: list[TierConfig], redis_url: str | None = None,
                  **extra: Any) -> Settings:
    redis = RedisConfig(url=redis_url, prefix="kvt", socket_timeout_s=0.3,
                        connect_timeout_s=0.3, retry_interval_s=0.1)
    extra.setdefault("mover_interval_s", 0.01)
    return Settings(tiers=tiers, redis=redis, codec=CodecConfig(), device="auto", **extra)


def wait_until(cond: Callable[[], bool], timeout_s: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        time.sleep(0.01)


StoreFactory = Callable[..., TierStore]
