"""Importance-aware placement, semantic grouping and the int3 rows of the evaluation."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kvtier.errors import InvalidArgument
from kvtier.lab.eval.catalog import Catalog
from kvtier.lab.eval.harness import run_quality
from kvtier.lab.eval.placement import Mover, keynorm_importance
from kvtier.lab.eval.quant import QuantSpec
from kvtier.lab.eval.research import SemanticTransform
from kvtier.lab.eval.transforms import Identity, QuantTransform, codecs_available
from kvtier.lab.eval.variant import Variant
from kvtier.types import Page

PAGE = 32


def _variant(**kw: Any) -> Variant:
    return Variant(name="v", tiers=(Identity(), Identity(), Identity()), fractions=(0.2, 0.3),
                   **kw)


def test_the_mover_keeps_ages_counts_demotes_the_least_important_and_never_promotes() -> None:
    g = torch.Generator().manual_seed(0)
    importance = {j: float(x) for j, x in enumerate(torch.rand(30, generator=g))}
    for hot_by_age in (False, True):
        var = _variant(placement="keynorm", hot_by_age=hot_by_age)
        mover = Mover(var)
        before: dict[int, int] = {}
        for n in range(1, 31):
            tiers = mover.step(n, importance)
            assert [sum(1 for t in tiers.values() if t == i) for i in range(3)] == var.counts(n)
            assert all(tiers[j] >= t for j, t in before.items())  # precision only goes down
            before = tiers
        if hot_by_age:  # the fp16 tier holds exactly the newest pages
            assert sorted(j for j, t in before.items() if t == 0) == list(range(24, 30))
    # with every page present from the start, the tiers sort the pages by importance
    mover = Mover(_variant(placement="keynorm"))
    tiers = mover.step(30, importance)
    rank = sorted(importance, key=lambda j: -importance[j])
    assert [tiers[j] for j in rank] == sorted(tiers[j] for j in rank)


def test_lower_key_norm_is_more_important() -> None:
    g = torch.Generator().manual_seed(1)
    k = torch.randn(2, 8, 2, 16, generator=g)
    small = Page(k=k, v=k, start_position=0)
    big = Page(k=3 * k, v=k, start_position=0)
    assert keynorm_importance(small) > keynorm_importance(big)


def test_importance_moves_pages_but_never_changes_their_bytes(tiny_model: Any,
                                                             tiny_ids: torch.Tensor) -> None:
    cold = QuantTransform(QuantSpec(bits=3, k_group=16, v_group=16), "q3")
    warm = QuantTransform(QuantSpec(bits=8, k_group=16, v_group=16), "q8")
    variants = [Variant(name=f"{p}-{h}", tiers=(Identity(), warm, cold), fractions=(0.2, 0.3),
                        placement=p, hot_by_age=h)
                for p, h in (("age", False), ("keynorm", False), ("keynorm", True),
                             ("attn", False), ("attn", True))]
    rep = run_quality(tiny_model, tiny_ids, variants, page_tokens=PAGE, progress=False)
    bits = {r.name: r.bits_per_element for r in rep.results}
    # the same number of pages in each tier, so the same bits (the transforms' sizes are fixed)
    assert len(set(bits.values())) == 1
    # a stored page is the transform's output whichever signal placed it
    page = Page(k=torch.randn(2, PAGE, 2, 16).half(), v=torch.randn(2, PAGE, 2, 16).half(),
                start_position=PAGE)
    a, b = cold.roundtrip(page), cold.roundtrip(page)
    assert torch.equal(a.page.k, b.page.k) and a.nbytes == b.nbytes


def test_catalog_names() -> None:
    cat = Catalog()
    v = cat.variant("hyb-keynorm:0.10:0.30")
    assert v.placement == "keynorm" and v.hot_by_age and v.fractions == (0.10, 0.30)
    v = cat.variant("imp-attn")
    assert v.placement == "attn" and not v.hot_by_age and v.fractions == (0.15, 0.35)
    assert isinstance(cat.transform("group-sem:3"), SemanticTransform)
    assert isinstance(cat.transform("group-pos:3"), QuantTransform)
    for bad in ("imp-foo", "group-sem:7", "mixed3:0.1"):
        with pytest.raises(InvalidArgument):
            cat.variant(bad)
    if codecs_available():
        v = cat.variant("mixed3:0.1:0.2:0.3")
        assert [t.name for t in v.tiers] == ["none", "int8", "int4a", "int3"]


def test_semantic_groups_put_the_page_back_in_order_and_charge_the_order() -> None:
    g = torch.Generator().manual_seed(2)
    # two kinds of tokens interleaved: grouped by similarity, each group holds one kind
    k = torch.randn(2, 64, 2, 16, generator=g) * 0.1
    k[:, 1::2] += 5.0
    page = Page(k=k.half(), v=torch.randn(2, 64, 2, 16, generator=g).half(), start_position=64)
    spec = QuantSpec(bits=3, k_group=16, v_group=16)
    pos = QuantTransform(spec, "pos").roundtrip(page)
    sem = SemanticTransform(spec, "sem").roundtrip(page)
    err_pos = (pos.page.k.float() - page.k.float()).square().mean()
    err_sem = (sem.page.k.float() - page.k.float()).square().mean()
    assert err_sem < err_pos / 4  # back in place: the error is small at every position
    assert torch.equal(sem.page.v, pos.page.v)
    assert sem.nbytes == pos.nbytes + 2 * 2 * 64 * 6 // 8  # 6 bits a token per (layer, head)
