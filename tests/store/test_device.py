"""The hot tier's medium: CUDA when present (same code path), CPU otherwise."""

from __future__ import annotations

import pytest
import torch

from kvtier.errors import ConfigError
from kvtier.store.tiers import Promoted, resolve_device
from kvtier.types import Codec, Medium, Page, Precision

from .helpers import PAGE_BYTES, StoreFactory, key, make_page, make_settings, tier

NS = "dev"


def test_auto_device_follows_cuda_availability() -> None:
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == want
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ConfigError, match="device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda:0")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_hot_tier_on_cuda(make_store: StoreFactory) -> None:
    settings = make_settings([
        tier("hot", Medium.DEVICE, Codec.NONE, 8 * PAGE_BYTES),
        tier("warm", Medium.HOST, Codec.INT8, 8 * PAGE_BYTES),
        tier("cold", Medium.HOST, Codec.INT4, 8 * PAGE_BYTES),
    ])
    store = make_store(settings)
    page = make_page(1)
    store.put(NS, [(key(0), page), (key(1), make_page(2))])
    engine = store._engine  # noqa: SLF001
    hot = engine.snapshot()[0]
    held = hot.held[hot.pages[0]]  # type: ignore[index]
    assert isinstance(held, Page) and held.k.device.type == "cuda"
    got = store.get(NS, [key(0)])[0]
    assert got is not None and got.page.k.device.type == "cpu"
    assert torch.equal(got.page.k, page.k) and torch.equal(got.page.v, page.v)
    raw = store.get_raw(NS, [key(0)])[0]
    assert raw is not None and bytes(raw.k) == page.k.view(torch.uint8).numpy().tobytes()
    assert store.demote(NS, [key(1)], "cold") == [True]
    assert store.promote(NS, [key(1)], "hot") == [True]
    hot = engine.snapshot()[0]
    back = hot.held[hot.pages[-1]]  # type: ignore[index]
    assert isinstance(back, Promoted) and back.page.k.device.type == "cuda"
    again = store.get(NS, [key(1)])[0]
    assert again is not None and again.precision is Precision.INT4 and again.tier == "hot"
