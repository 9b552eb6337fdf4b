"""int4a as a tier codec: the default stack demotes int8 -> int4a on the codes, reads back."""

from __future__ import annotations

import torch
from codec_helpers import make_kv

from kvtier.codecs import encode, transcode
from kvtier.config import CodecConfig, RedisConfig, Settings
from kvtier.store.store import TierStore
from kvtier.types import Codec, Medium, Precision


def test_default_cold_and_remote_tiers_use_int4a() -> None:
    tiers = {t.name: t.codec for t in Settings().tiers}
    assert tiers == {"hot": Codec.NONE, "warm": Codec.INT8, "cold": Codec.INT4A,
                     "remote": Codec.INT4A}


def test_demotion_through_warm_lands_as_the_direct_int4a_blob() -> None:
    settings = Settings(redis=RedisConfig(url=None), device="cpu", mover_interval_s=0.01,
                        codec=CodecConfig())
    assert [t.medium for t in settings.tiers][:3] == [Medium.DEVICE, Medium.HOST, Medium.HOST]
    store = TierStore(settings)
    try:
        page = make_kv((4, 64, 2, 64), start=0, seed=3)
        store.put("ns", [(b"k", page)])
        store.demote("ns", [b"k"], "warm")
        store.demote("ns", [b"k"], "cold")
        got = store.get("ns", [b"k"])[0]
        assert got is not None and got.tier == "cold" and got.precision is Precision.INT4
        want = transcode(encode(page, Codec.INT8, settings.codec), Codec.INT4A, settings.codec)
        from kvtier.codecs import decode

        ref = decode(want).page
        assert torch.equal(got.page.k, ref.k) and torch.equal(got.page.v, ref.v)
        assert store.stats().tiers[2].codec == "int4a"
    finally:
        store.close()
