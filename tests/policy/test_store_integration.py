"""The policies plugged into a real TierStore: demotion order, stats, no store changes."""

from __future__ import annotations

import time

import pytest
import torch

from kvtier.config import CodecConfig, RedisConfig, Settings, TierConfig
from kvtier.policy.adapter import ARCPolicy, S3FIFOPolicy
from kvtier.policy.learned.policy import LearnedPolicy
from kvtier.store.policy import Policy
from kvtier.store.store import TierStore
from kvtier.types import Codec, Medium, Page

PAGE = 2 * 8 * 8 * 2  # k+v bytes of one [1, 8, 1, 8] fp16 page


def _page(seed: int) -> Page:
    g = torch.Generator().manual_seed(seed)
    return Page(k=torch.randn((1, 8, 1, 8), generator=g).half(),
                v=torch.randn((1, 8, 1, 8), generator=g).half(), start_position=64)


def _settings() -> Settings:
    tiers = [
        TierConfig(name="hot", medium=Medium.DEVICE, codec=Codec.NONE, capacity_bytes=4 * PAGE,
                   high_watermark=1.0, low_watermark=0.5),
        TierConfig(name="cold", medium=Medium.HOST, codec=Codec.INT8,
                   capacity_bytes=1000 * PAGE, high_watermark=1.0, low_watermark=0.5),
    ]
    return Settings(tiers=tiers, redis=RedisConfig(url=None), codec=CodecConfig(),
                    mover_interval_s=0.01, device="cpu")


@pytest.mark.parametrize("make", [ARCPolicy, S3FIFOPolicy,
                                  lambda: LearnedPolicy(device="cpu", min_labels=20)])
def test_store_runs_with_the_policy(make: type[Policy]) -> None:
    policy = make()
    store = TierStore(_settings(), policy)
    store.start()
    try:
        keys = [b"k%03d" % i for i in range(24)]
        for rnd in range(3):
            for i in range(0, 24, 4):
                chain = keys[i:i + 4]
                got = store.get("ns", chain)
                missing = [j for j, g in enumerate(got) if g is None]
                if missing:
                    store.put("ns", [(chain[j], _page(i + j)) for j in missing],
                              chain_positions=missing)
            store.get("ns", keys[:4])  # the first chain is hot every round
            time.sleep(0.05)
        stats = store.stats()
        pages = sum(t.pages for t in stats.tiers)
        assert pages == 24
        assert stats.tiers[0].pages <= 4 and stats.tiers[0].demotions > 0
        assert stats.policy.name == policy.name
        assert all(r is not None for r in store.get("ns", keys))
    finally:
        store.close()
