"""The evaluation plumbing on a tiny random-weight Llama: exactness of `none`, effect of codecs."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kvtier.errors import InvalidArgument
from kvtier.lab.eval.catalog import INT4R, Catalog
from kvtier.lab.eval.harness import run_quality
from kvtier.lab.eval.quant import QuantSpec
from kvtier.lab.eval.transforms import Identity, QuantTransform, codecs_available
from kvtier.lab.eval.variant import Variant, uniform

PAGE = 32


def _q(name: str, **kw: Any) -> QuantTransform:
    return QuantTransform(QuantSpec(k_group=16, v_group=16, **kw), name)


def test_none_is_exactly_the_reference(tiny_model: Any, tiny_ids: torch.Tensor) -> None:
    variants = [uniform(Identity(name="identity"))]
    if codecs_available():
        variants.append(Catalog().variant("none"))
    rep = run_quality(tiny_model, tiny_ids, variants, page_tokens=PAGE, progress=False)
    assert rep.tokens == 256
    for r in rep.results:
        assert r.scores.kl == 0.0
        assert r.scores.top1 == 1.0
        assert r.scores.ppl == rep.ppl_ref
        assert r.delta_pct == 0.0
        assert r.scores.cosine_per_layer == pytest.approx([1.0, 1.0], abs=1e-12)
        assert r.scores.positions == 256 - PAGE - 1
    assert rep.results[0].bits_per_element == 16.0  # float16 pages, stored as put


def test_float32_pages_cost_32_bits(tiny_model: Any, tiny_ids: torch.Tensor) -> None:
    rep = run_quality(tiny_model, tiny_ids[:96], [uniform(Identity())], page_tokens=PAGE,
                      kv_dtype=torch.float32, progress=False)
    assert rep.results[0].bits_per_element == 32.0
    assert rep.results[0].scores.kl == 0.0


def test_quantized_paths_change_the_output_in_order(tiny_model: Any,
                                                    tiny_ids: torch.Tensor) -> None:
    variants = [uniform(_q("int8", bits=8)), uniform(_q("int4", bits=4)),
                uniform(_q("int2", bits=2))]
    rep = run_quality(tiny_model, tiny_ids, variants, page_tokens=PAGE, progress=False)
    kl = {r.name: r.scores.kl for r in rep.results}
    cos = {r.name: r.scores.cosine_min for r in rep.results}
    assert 0.0 < kl["int8"] < kl["int4"] < kl["int2"]
    assert 1.0 > cos["int8"] > cos["int4"] > cos["int2"]
    bits = {r.name: r.bits_per_element for r in rep.results}
    # codes + fp16 scale and min per group of 16 + a 64-byte header per page
    elems = 2 * 2 * PAGE * 2 * 16
    for name, b in (("int8", 8), ("int4", 4), ("int2", 2)):
        assert bits[name] == pytest.approx(b + 32 / 16 + 64 * 8 / elems)


def test_real_codecs_change_the_output(tiny_model: Any, tiny_ids: torch.Tensor) -> None:
    if not codecs_available():
        pytest.skip("kvtier.codecs has no encode/decode yet")
    from kvtier.config import CodecConfig

    cat = Catalog(params=CodecConfig(group_size=16))
    rep = run_quality(tiny_model, tiny_ids, [cat.variant(c) for c in ("int8", "int4", "int4a")],
                      page_tokens=PAGE, progress=False)
    int8, int4, int4a = rep.results
    assert 0.0 < int8.scores.kl < int4.scores.kl
    assert 0.0 < int8.scores.kl < int4a.scores.kl
    assert int4.scores.top1 < 1.0 and int4a.scores.top1 < 1.0
    assert 4.0 < int4.bits_per_element < int8.bits_per_element < 16.0
    # the same codes and grid as int4, plus the key bit map (4 bits a kept channel, padded)
    assert 0.0 < int4a.bits_per_element - int4.bits_per_element < 0.1


def test_int4a_goes_through_the_tier_codec(tiny_model: Any, tiny_ids: torch.Tensor) -> None:
    from kvtier.codecs import decode, encode
    from kvtier.config import CodecConfig
    from kvtier.lab.eval.harness import page_from_cache
    from kvtier.lab.eval.transforms import CodecTransform
    from kvtier.types import Codec

    params = CodecConfig(group_size=16)
    t = Catalog(params=params).transform("int4a")
    assert isinstance(t, CodecTransform) and t.codec is Codec.INT4A
    with torch.inference_mode():
        out = tiny_model(input_ids=tiny_ids[None, :PAGE], use_cache=True)
    page = page_from_cache(out.past_key_values, 0, PAGE, torch.float16)
    rt = t.roundtrip(page)
    blob = encode(page, Codec.INT4A, params)
    assert rt.nbytes == len(blob)
    assert torch.equal(rt.page.k, decode(blob).page.k)
    with pytest.raises(InvalidArgument):
        Catalog(params=params, use_codecs=False).transform("int4a")
    mixed = Catalog(params=params).variant("mixed")
    assert [x.name for x in mixed.tiers] == ["none", "int8", "int4a"]
    assert [x.name for x in Catalog(params=params).variant("mixed4:0.1:0.2").tiers][-1] == "int4"


def test_recent_window_keeps_the_last_page_exact(tiny_model: Any,
                                                 tiny_ids: torch.Tensor) -> None:
    # Two pages: the only past page lies entirely inside a one-page window, so nothing is
    # quantized when it is used and the result is the reference's.
    ids = tiny_ids[: 2 * PAGE]
    rep = run_quality(tiny_model, ids, [uniform(_q("w", bits=2), window=PAGE),
                                        uniform(_q("no-w", bits=2))],
                      page_tokens=PAGE, progress=False)
    w, no_w = rep.results
    assert w.scores.kl == 0.0
    assert no_w.scores.kl > 0.0
    # the final page's window is charged as fp16; the first page as 2-bit
    assert w.bits_per_element > no_w.bits_per_element


def test_mixed_placement_sits_between_its_tiers(tiny_model: Any,
                                                tiny_ids: torch.Tensor) -> None:
    int8, int2 = _q("int8", bits=8), _q("int2", bits=2)
    mixed = Variant(name="mixed", tiers=(Identity(), int8, int2), fractions=(0.25, 0.25))
    all_hot = Variant(name="hot", tiers=(Identity(), int8, int2), fractions=(1.0, 0.0))
    rep = run_quality(tiny_model, tiny_ids, [uniform(int8), uniform(int2), mixed, all_hot],
                      page_tokens=PAGE, progress=False)
    r = {x.name: x for x in rep.results}
    assert r["hot"].scores.kl == 0.0
    assert r["int8"].scores.kl < r["mixed"].scores.kl < r["int2"].scores.kl
    # final placement of 8 pages: 2 as put, 2 int8, 4 int2
    want = (2 * 16 + 2 * r["int8"].bits_per_element + 4 * r["int2"].bits_per_element) / 8
    assert r["mixed"].bits_per_element == pytest.approx(want)


def test_tier_of_places_pages_by_age() -> None:
    v = Variant(name="m", tiers=(Identity(), Identity(), Identity()), fractions=(0.15, 0.35))
    tiers = [v.tier_of(age, 20) for age in range(20)]
    assert tiers == [0] * 3 + [1] * 7 + [2] * 10


def test_bad_input_names_the_field(tiny_model: Any, tiny_ids: torch.Tensor) -> None:
    with pytest.raises(InvalidArgument) as e:
        run_quality(tiny_model, tiny_ids[:PAGE], [uniform(Identity())], page_tokens=PAGE)
    assert e.value.field == "tokens"
    with pytest.raises(InvalidArgument) as e:
        run_quality(tiny_model, tiny_ids, [uniform(Identity()), uniform(Identity())],
                    page_tokens=PAGE)
    assert e.value.field == "codecs"
    with pytest.raises(InvalidArgument) as e:
        Catalog().variant("int2")
    assert e.value.field == "codecs"
    with pytest.raises(InvalidArgument) as e:
        Catalog().variant("mixed:0.5")
    assert e.value.field == "codecs"
    with pytest.raises(InvalidArgument) as e:
        Variant(name="m", tiers=(Identity(), Identity()), fractions=(0.7, 0.6))
    assert e.value.field == "fractions"
    with pytest.raises(InvalidArgument) as e:
        # INT4R groups keys over 64 tokens: pages of 32 cannot hold a group
        run_quality(tiny_model, tiny_ids, [uniform(QuantTransform(INT4R, "g64"))],
                    page_tokens=PAGE, progress=False)
    assert e.value.field == "k_group"


def test_int4q_is_calibrated_and_spends_the_int4_budget(tiny_model: Any,
                                                        tiny_ids: torch.Tensor) -> None:
    # Whether it beats uniform bits depends on real query statistics (random weights have
    # none); test_quant pins the weighted error, the SmolLM2 tables the model-level effect.
    from dataclasses import replace

    from kvtier.lab.eval.allocate import AllocTransform, query_energy
    from kvtier.lab.eval.catalog import INT4Q

    with pytest.raises(InvalidArgument) as e:
        Catalog().variant("int4q")
    assert e.value.field == "codecs"
    energy = query_energy(tiny_model, tiny_ids.flip(0))
    assert energy.shape == (2, 2, 16)
    spec = replace(INT4Q, k_group=16, v_group=16)
    rep = run_quality(tiny_model, tiny_ids, [
        uniform(AllocTransform(spec, energy, name="int4q")),
        uniform(QuantTransform(spec, "int4"))], page_tokens=PAGE, progress=False)
    a, u = rep.results
    assert a.scores.kl > 0.0 and a.scores.top1 < 1.0
    # same code budget; the per-page allocation map costs 4 bits per key channel
    assert a.bits_per_element - u.bits_per_element == pytest.approx(
        0.5 * 2 * 2 * 16 * 8 / (2 * 2 * PAGE * 2 * 16))


def test_ablation_has_the_tier_codecs_settings() -> None:
    from kvtier.lab.eval.catalog import ablation
    from kvtier.lab.eval.transforms import CodecTransform
    from kvtier.types import Codec

    rows = {v.name: v.tiers[0] for v in ablation(None)}
    real = [t for t in rows.values() if isinstance(t, CodecTransform)]
    assert [t.codec for t in real] == [Codec.INT4A] * 3
    assert {t.params.key_bits for t in real} == {4.0, 4.25}
    assert min(t.params.min_outlier_channels for t in real) == 0
