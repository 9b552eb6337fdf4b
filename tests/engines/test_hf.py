"""The transformers integration against a real daemon: restore, reuse rules, puts, failures."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import numpy as np
import pytest
import torch
from tiny_llama import make_tiny_model

from kvtier.procs.redis import free_port
from kvtier.daemon import Daemon
from kvtier_client import AsyncKVTierClient, KVTierClient, LookupResult, Page
from kvtier_client.engines.hf import (
    AsyncKVTierConnector,
    KVTierConnector,
    cache_kwarg,
    fingerprint,
)
from kvtier_client.engines.layout import LayoutMismatch

from .conftest import NS, PAGE, prompt


def last_logits(model: Any, ids: torch.Tensor, **kw: Any) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids, **kw).logits[0, -1].float()


def kl(ref: torch.Tensor, got: torch.Tensor) -> float:
    p, q = torch.log_softmax(ref.double(), -1), torch.log_softmax(got.double(), -1)
    return float((p.exp() * (p - q)).sum())


def fp16_reference(model: Any, ids: torch.Tensor, prefix: int) -> torch.Tensor:
    """Logits after ``prefix`` tokens of KV rounded through float16 (what the hot tier keeps)."""
    from transformers import DynamicCache

    with torch.inference_mode():
        full = model(ids[:, :prefix], use_cache=True)
        cache = DynamicCache()
        for i, layer in enumerate(full.past_key_values.layers):
            cache.update(layer.keys.half().float(), layer.values.half().float(), i)
        return model(ids[:, prefix:], **{cache_kwarg(model): cache}).logits[0, -1].float()


def seed_pages(kv: KVTierConnector, model: Any, ids: torch.Tensor) -> int:
    """Run the prompt through the model with an empty daemon and put its full pages."""
    cache = kv.restore(ids)
    assert cache.restored_tokens == 0
    last_logits(model, ids, **kv.cache_kwargs(cache))
    return kv.save(cache, wait=True).result()


def test_hot_restore_gives_recompute_logits_to_float16_rounding(
        model: Any, client: KVTierClient) -> None:
    ids = prompt(1)
    kv = KVTierConnector(model, client, page_tokens=PAGE, strict=True)
    assert seed_pages(kv, model, ids) == 6  # 100 tokens: 6 full pages of 16
    cache = kv.restore(ids)
    assert cache.restored_tokens == 96 and cache.restore.tiers == ("hot",) * 6
    assert cache.restore.precisions == (16,) * 6
    got = last_logits(model, ids[:, 96:], **kv.cache_kwargs(cache))
    assert torch.allclose(got, fp16_reference(model, ids, 96), atol=1e-4, rtol=1e-4)
    recompute = last_logits(model, ids)
    assert kl(recompute, got) < 1e-4
    assert int(got.argmax()) == int(recompute.argmax())


@pytest.mark.parametrize("tier, bound", [("warm", 1e-3), ("cold", 0.05)])
def test_lower_tiers_restore_with_bounded_error(model: Any, daemon: Daemon,
                                                client: KVTierClient, tier: str,
                                                bound: float) -> None:
    ids = prompt(2)
    kv = KVTierConnector(model, client, page_tokens=PAGE, strict=True)
    seed_pages(kv, model, ids)
    keys = kv.layout.keys(ids[0].tolist(), NS)
    assert daemon.context.store.demote(NS, keys, tier) == [True] * 6
    cache = kv.restore(ids)
    assert cache.restored_tokens == 96 and set(cache.restore.tiers) == {tier}
    assert set(cache.restore.precisions) == {8 if tier == "warm" else 4}
    got = last_logits(model, ids[:, 96:], **kv.cache_kwargs(cache))
    err = kl(last_logits(model, ids), got)
    assert 0 < err < bound


def test_partial_prefix_reuses_exactly_the_shared_pages(model: Any,
                                                        client: KVTierClient) -> None:
    kv = KVTierConnector(model, client, page_tokens=PAGE, strict=True)
    a = prompt(3)
    seed_pages(kv, model, a)
    b = torch.cat([a[:, :40], prompt(4, 60)], dim=1)  # shares 2 full pages and 8 tokens
    cache = kv.restore(b)
    assert cache.restored_tokens == 32
    got = last_logits(model, b[:, 32:], **kv.cache_kwargs(cache))
    assert kl(last_logits(model, b), got) < 1e-4
    # the prompt's new full pages go back once the next forward pass starts
    kv.save(cache, wait=True)
    assert kv.saves.stored == 6 + 4  # pages 2..5 of b were new


def test_a_prompt_never_reuses_a_whole_prompt(model: Any, client: KVTierClient) -> None:
    """At least one token is left to compute: the model needs it for the next logits."""
    kv = KVTierConnector(model, client, page_tokens=PAGE, strict=True)
    ids = prompt(5, 64)
    seed_pages(kv, model, ids)
    cache = kv.restore(ids)
    assert cache.restored_tokens == 48
    got = last_logits(model, ids[:, 48:], **kv.cache_kwargs(cache))
    assert int(got.argmax()) == int(last_logits(model, ids).argmax())


def test_other_namespace_and_other_model_never_share(model: Any, daemon: Daemon) -> None:
    ids = prompt(6)
    with KVTierClient(daemon.grpc_address, "tenant-a") as a, \
            KVTierClient(daemon.grpc_address, "tenant-b") as b:
        kv_a = KVTierConnector(model, a, page_tokens=PAGE, strict=True)
        seed_pages(kv_a, model, ids)
        assert KVTierConnector(model, b, page_tokens=PAGE).restore(ids).restored_tokens == 0
        other = make_tiny_model(seed=1)  # same shapes, other weights
        assert fingerprint(other) != fingerprint(model)
        assert KVTierConnector(other, a, page_tokens=PAGE).restore(ids).restored_tokens == 0
        assert kv_a.restore(ids).restored_tokens == 96


def test_fingerprint_ignores_the_weights_dtype(model: Any) -> None:
    """A bfloat16 copy of a checkpoint reads the float32 copy's pages (the KV is the same
    computation); the fingerprint rounds its weight samples to bfloat16 for that."""
    twin = make_tiny_model()
    twin.to(torch.bfloat16)
    assert fingerprint(twin) == fingerprint(model)


def test_a_miss_in_the_chain_stops_reuse_there(model: Any, daemon: Daemon,
                                               client: KVTierClient) -> None:
    kv = KVTierConnector(model, client, page_tokens=PAGE, strict=True)
    ids = prompt(7)
    seed_pages(kv, model, ids)
    keys = kv.layout.keys(ids[0].tolist(), NS)
    assert client.delete([keys[2]]) == 1
    cache = kv.restore(ids)
    assert cache.restored_tokens == 32
    got = last_logits(model, ids[:, 32:], **kv.cache_kwargs(cache))
    assert kl(last_logits(model, ids), got) < 1e-4


def put_foreign_pages(client: KVTierClient, kv: KVTierConnector, ids: torch.Tensor,
                      shape: tuple[int, ...], dtype: Any = np.float16) -> None:
    """Pages under the prompt's keys that another writer shaped differently."""
    keys = kv.layout.keys(ids[0].tolist(), NS)
    rng = np.random.default_rng(0)
    pages = [Page(rng.standard_normal(shape).astype(dtype),
                  rng.standard_normal(shape).astype(dtype), start_position=PAGE * i)
             for i in range(len(keys))]
    client.put(keys, pages)


@pytest.mark.parametrize("shape, names", [
    ((3, PAGE, 2, 16), "layers 3 != 2"),
    ((2, PAGE, 4, 16), "kv_heads 4 != 2"),
    ((2, PAGE, 2, 32), "head_dim 32 != 16"),
    ((2, 8, 2, 16), "tokens 8 != 16"),
])
def test_pages_that_do_not_fit_the_model_mean_recompute(model: Any, client: KVTierClient,
                                                        shape: tuple[int, ...],
                                                        names: str) -> None:
    ids = prompt(8)
    kv = KVTierConnector(model, client, page_tokens=PAGE)
    put_foreign_pages(client, kv, ids, shape)
    cache = kv.restore(ids)
    assert cache.restored_tokens == 0
    assert cache.restore_error is not None and names in cache.restore_error
    assert "LayoutMismatch" in cache.restore_error
    got = last_logits(model, ids, **kv.cache_kwargs(cache))
    assert torch.equal(got, last_logits(model, ids))
    strict = KVTierConnector(model, client, page_tokens=PAGE, strict=True)
    with pytest.raises(LayoutMismatch, match=names):
        strict.restore(ids)


def test_a_page_dtype_the_worker_does_not_accept_is_refused(model: Any,
                                                            client: KVTierClient) -> None:
    ids = prompt(9)
    kv = KVTierConnector(model, client, page_tokens=PAGE, accept=("float16",))
    put_foreign_pages(client, kv, ids, (2, PAGE, 2, 16), np.float32)
    cache = kv.restore(ids)
    assert cache.restored_tokens == 0
    assert cache.restore_error is not None and "dtype float32 not in float16" in cache.restore_error
    # a worker that accepts float32 pages uses them (converted into its cache)
    assert KVTierConnector(model, client, page_tokens=PAGE).restore(ids).restored_tokens == 96


def test_a_daemon_that_is_down_means_recompute(model: Any) -> None:
    ids = prompt(10)
    with KVTierClient(f"127.0.0.1:{free_port()}", NS, timeout_s=5) as c:
        kv = KVTierConnector(model, c, page_tokens=PAGE, timeout_s=2)
        t0 = time.monotonic()
        cache = kv.restore(ids)
        assert time.monotonic() - t0 < 3
        assert cache.restored_tokens == 0 and "UNAVAILABLE" in (cache.restore_error or "")
        got = last_logits(model, ids, **kv.cache_kwargs(cache))
        assert torch.equal(got, last_logits(model, ids))
        kv.save(cache, wait=True)  # the put fails quietly, counted
        assert kv.saves.failed == 6 and kv.saves.stored == 0


def test_a_daemon_that_never_answers_means_recompute_within_the_deadline(model: Any) -> None:
    """A peer that accepts the connection and then says nothing (a hung daemon)."""
    srv = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        with KVTierClient(f"127.0.0.1:{srv.getsockname()[1]}", NS, timeout_s=5,
                          shared_memory=False) as c:
            kv = KVTierConnector(model, c, page_tokens=PAGE, timeout_s=0.5)
            t0 = time.monotonic()
            cache = kv.restore(prompt(11))
            assert time.monotonic() - t0 < 2
            assert cache.restored_tokens == 0
            assert "DEADLINE_EXCEEDED" in (cache.restore_error or "")
    finally:
        stop.set()
        t.join()
        for s in held:
            s.close()
        srv.close()


def test_generate_matches_plain_generate_and_puts_after_the_first_token(
        model: Any, client: KVTierClient) -> None:
    ids = prompt(12)
    kv = KVTierConnector(model, client, page_tokens=PAGE, strict=True)
    plain = model.generate(ids, max_new_tokens=13, do_sample=False)
    first = kv.generate(ids, max_new_tokens=13, do_sample=False)
    kv.flush()
    assert torch.equal(first, plain)
    assert kv.saves.stored == 6
    assert kv.last_restore is not None and kv.last_restore.restored_tokens == 0
    again = kv.generate(ids, max_new_tokens=13, do_sample=False, save_generated=True)
    kv.flush()
    assert torch.equal(again, plain)
    assert kv.last_restore is not None and kv.last_restore.restored_tokens == 96
    assert kv.saves.stored == 6 + 1  # 112 tokens cached: one more full page
    longer = torch.cat([plain, prompt(13, 20)], dim=1)  # the next turn of the conversation
    assert kv.restore(longer).restored_tokens == 112


def test_the_put_starts_only_once_the_first_token_is_out(model: Any,
                                                          client: KVTierClient) -> None:
    """A hand-written decode loop: nothing is put during the prefill; the next step puts."""
    ids = prompt(14)
    kv = KVTierConnector(model, client, page_tokens=PAGE, strict=True)
    cache = kv.restore(ids)
    logits = last_logits(model, ids, **kv.cache_kwargs(cache))
    kv.flush()
    assert kv.saves.stored == 0 and client.lookup(kv.layout.keys(ids[0].tolist(), NS)
                                                  ).prefix_length == 0
    tokens = [int(logits.argmax())]
    for _ in range(5):
        step = torch.tensor([[tokens[-1]]])
        tokens.append(int(last_logits(model, step, **kv.cache_kwargs(cache)).argmax()))
    kv.flush()
    assert kv.saves.stored == 6
    plain = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert plain[0, 100:].tolist() == tokens


def test_restored_cache_decodes_like_a_recomputed_one(model: Any,
                                                      client: KVTierClient) -> None:
    """The restored cache's layers grow in place over many steps (past their first room)."""
    ids = prompt(15)
    kv = KVTierConnector(model, client, page_tokens=PAGE, strict=True)
    seed_pages(kv, model, ids)
    cache = kv.restore(ids, capacity=100)  # forces the buffers to grow while decoding
    assert cache.restored_tokens == 96
    out = model.generate(ids, max_new_tokens=40, do_sample=False, **kv.cache_kwargs(cache))
    plain = model.generate(ids, max_new_tokens=40, do_sample=False)
    assert torch.equal(out, plain)
    assert cache.get_seq_length() == 139


def test_asyncio_connector(model: Any, daemon: Daemon) -> None:
    async def with_client(target: str) -> None:
        client = AsyncKVTierClient(target, NS, timeout_s=20)
        try:
            kv = AsyncKVTierConnector(model, client, page_tokens=PAGE, strict=True)
            ids = prompt(16)
            plain = model.generate(ids, max_new_tokens=8, do_sample=False)
            out = await kv.generate(ids, max_new_tokens=8, do_sample=False)
            await kv.flush()
            assert torch.equal(out, plain) and kv.saves.stored == 6
            cache = await kv.restore(ids)
            assert cache.restored_tokens == 96
            got = last_logits(model, ids[:, 96:], **kv.cache_kwargs(cache))
            assert kl(last_logits(model, ids), got) < 1e-4
        finally:
            await client.close()

    asyncio.run(with_client(daemon.grpc_address))


def test_layer_grows_in_place_and_follows_crop_and_reorder() -> None:
    from kvtier_client.engines.hf import KVTierLayer

    layer = KVTierLayer()
    parts = [torch.randn(1, 2, n, 4) for n in (3, 1, 1)]
    for p in parts:
        k, v = layer.update(p, -p)
    whole = torch.cat(parts, dim=2)
    assert torch.equal(k, whole) and torch.equal(v, -whole)
    buf_ptr = k.data_ptr()
    layer.crop(-2)  # speculative decoding drops rejected tokens
    k, v = layer.update(parts[0][:, :, :1], -parts[0][:, :, :1])
    assert k.data_ptr() == buf_ptr  # the same buffer, written after the kept tokens
    assert torch.equal(k, torch.cat([whole[:, :, :3], parts[0][:, :, :1]], dim=2))
    layer.batch_repeat_interleave(2)  # beam search widens the batch: a new tensor, adopted
    k, v = layer.update(torch.zeros(2, 2, 1, 4), torch.zeros(2, 2, 1, 4))
    assert k.shape == (2, 2, 5, 4) and torch.equal(k[1, :, :4], k[0, :, :4])
    layer.reset()
    k, _ = layer.update(parts[1], parts[1])
    assert torch.equal(k, parts[1])


def test_beam_search_over_a_restored_cache(model: Any, client: KVTierClient) -> None:
    ids = prompt(17)
    kv = KVTierConnector(model, client, page_tokens=PAGE, strict=True)
    seed_pages(kv, model, ids)
    cache = kv.restore(ids)
    assert cache.restored_tokens == 96
    out = model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False,
                         **kv.cache_kwargs(cache))
    plain = model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False)
    assert torch.equal(out, plain)


def test_a_restore_fetched_in_several_gets(model: Any, client: KVTierClient,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Pages come in batches (the build of one overlaps the get of the next); a miss in a
    later batch still ends the run exactly there."""
    from kvtier_client.engines import hf

    kv = KVTierConnector(model, client, page_tokens=PAGE, strict=True)
    monkeypatch.setattr(hf, "FETCH_BYTES", 2 * 2 * 2 * PAGE * 2 * 16 * 2)  # two pages a get
    ids = prompt(18)
    seed_pages(kv, model, ids)
    keys = kv.layout.keys(ids[0].tolist(), NS)
    assert len(kv._core.batches(keys)) == 3  # noqa: SLF001
    cache = kv.restore(ids)
    assert cache.restored_tokens == 96
    got = last_logits(model, ids[:, 96:], **kv.cache_kwargs(cache))
    assert torch.allclose(got, fp16_reference(model, ids, 96), atol=1e-4, rtol=1e-4)
    assert client.delete([keys[3]]) == 1
    assert kv.restore(ids).restored_tokens == 48
    # gone between lookup and get: the lookup still counts six pages
    real = client.lookup
    monkeypatch.setattr(client, "lookup", lambda k, **kw: LookupResult(
        6, real(k, **kw).tiers))
    cache = kv.restore(ids)
    assert cache.restored_tokens == 48
    got = last_logits(model, ids[:, 48:], **kv.cache_kwargs(cache))
    assert kl(last_logits(model, ids), got) < 1e-4
