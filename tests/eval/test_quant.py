"""The prototype quantizer and the research transforms, on synthetic pages."""

from __future__ import annotations

import pytest
import torch

from kvtier.errors import InvalidArgument
from kvtier.lab.eval.quant import QuantSpec, hadamard, quantize_page
from kvtier.lab.eval.research import (
    Fp8Transform,
    GearTransform,
    HaarTransform,
    PcaVTransform,
    haar,
    inverse_haar,
    pca_basis,
)
from kvtier.types import Page


def _page(start: int = 0, seed: int = 0) -> Page:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(2, 64, 2, 16, generator=g)
    k[..., 3] *= 20.0  # an outlier channel, as post-RoPE keys have
    k[:, 0] *= 10.0  # an attention-sink token
    v = torch.randn(2, 64, 2, 16, generator=g)
    return Page(k=k.half(), v=v.half(), start_position=start)


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).square().mean())


def test_hadamard_is_orthonormal() -> None:
    h = hadamard(64, torch.device("cpu"))
    assert torch.allclose(h @ h.T, torch.eye(64), atol=1e-6)


def test_sinks_and_outliers_stay_at_full_precision() -> None:
    p = _page()
    q = quantize_page(p.k, p.v, 0, QuantSpec(bits=2, k_group=16, v_group=16, sink_tokens=4,
                                              outlier_channels=1))
    assert torch.equal(q.k[:, :4], p.k[:, :4])
    assert torch.equal(q.v[:, :4], p.v[:, :4])
    assert torch.equal(q.k[..., 3], p.k[..., 3])  # the largest channel is the outlier
    assert not torch.equal(q.k[:, 4:, :, :3], p.k[:, 4:, :, :3])
    # a later page has no sinks
    q2 = quantize_page(p.k, p.v, 64, QuantSpec(bits=2, k_group=16, v_group=16, sink_tokens=4))
    assert not torch.equal(q2.v[:, :4], p.v[:, :4])


def test_protections_and_bits_lower_the_error() -> None:
    p = _page()
    spec = QuantSpec(bits=4, k_group=16, v_group=16)
    base = quantize_page(p.k, p.v, 0, spec)
    int8 = quantize_page(p.k, p.v, 0, QuantSpec(bits=8, k_group=16, v_group=16))
    sinks = quantize_page(p.k, p.v, 0, QuantSpec(bits=4, k_group=16, v_group=16, sink_tokens=1))
    clip = quantize_page(p.k, p.v, 0, QuantSpec(bits=4, k_group=16, v_group=16, clip=True))
    assert _err(int8.k, p.k) < _err(base.k, p.k) / 100
    assert _err(sinks.k, p.k) < _err(base.k, p.k)
    assert _err(clip.v, p.v) < _err(base.v, p.v)
    per_token = quantize_page(p.k, p.v, 0, QuantSpec(bits=4, k_per_channel=False, k_group=16,
                                                     v_group=16))
    rotated = quantize_page(p.k, p.v, 0, QuantSpec(bits=4, k_per_channel=False, k_group=16,
                                                   v_group=16, rotate_k=True))
    assert _err(rotated.k, p.k) < _err(per_token.k, p.k)  # the rotation spreads the outlier
    assert sinks.nbytes > base.nbytes and clip.nbytes == base.nbytes


def test_eight_bit_metadata_is_smaller() -> None:
    p = _page()
    m16 = quantize_page(p.k, p.v, 0, QuantSpec(bits=4, k_group=16, v_group=16))
    m8 = quantize_page(p.k, p.v, 0, QuantSpec(bits=4, k_group=16, v_group=16, meta_bits=8))
    assert m8.nbytes < m16.nbytes
    assert _err(m8.v, p.v) < 2 * _err(m16.v, p.v)


def test_bad_specs_name_the_field() -> None:
    p = _page()
    for spec, field in ((QuantSpec(bits=1), "bits"), (QuantSpec(k_group=48), "k_group"),
                        (QuantSpec(k_group=16, v_group=5), "v_group"),
                        (QuantSpec(k_group=16, v_group=16, outlier_channels=16),
                         "outlier_channels"),
                        (QuantSpec(k_group=16, v_group=16, meta_bits=12), "meta_bits")):
        with pytest.raises(InvalidArgument) as e:
            quantize_page(p.k, p.v, 0, spec)
        assert e.value.field == field


def test_haar_round_trip_is_exact_up_to_rounding() -> None:
    x = torch.randn(2, 64, 2, 16, dtype=torch.float64)
    assert torch.allclose(inverse_haar(haar(x, 3), 3), x, atol=1e-12)
    assert haar(x, 3).square().sum() == pytest.approx(float(x.square().sum()))


def test_research_transforms_round_trip_close() -> None:
    p = _page()
    spec = QuantSpec(bits=4, k_group=16, v_group=16)
    base = quantize_page(p.k, p.v, 0, spec)
    fp8 = Fp8Transform(group=16).roundtrip(p)
    assert _err(fp8.page.v, p.v) < _err(base.v, p.v)
    assert fp8.nbytes < p.nbytes
    gear = GearTransform(spec, rank=2).roundtrip(p)
    assert _err(gear.page.v, p.v) < _err(base.v, p.v)
    assert gear.nbytes > base.nbytes
    h = HaarTransform(spec, levels=2).roundtrip(p)
    assert _err(h.page.v, p.v) < 0.05
    basis = pca_basis(p.v.float())
    full = PcaVTransform(QuantSpec(bits=8, k_group=16, v_group=16), basis, rank=16).roundtrip(p)
    assert _err(full.page.v, p.v) < 1e-3
    low = PcaVTransform(QuantSpec(bits=8, k_group=16, v_group=8), basis, rank=8).roundtrip(p)
    assert low.nbytes < full.nbytes
    assert _err(low.page.v, p.v) > _err(full.page.v, p.v)


def test_allocation_spends_the_budget_where_the_weight_is() -> None:
    from kvtier.lab.eval.allocate import allocate

    w = torch.tensor([[100.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    b = allocate(w, 4.0, 2, 8)
    assert b.sum(-1).tolist() == [16.0, 16.0]
    assert b[0, 0] > b[0, 1] and b[0, 0] <= 8
    assert b[1].tolist() == [4.0, 4.0, 4.0, 4.0]
    assert float(b.min()) >= 2


def test_calibrated_allocation_beats_uniform_bits_on_weighted_error() -> None:
    from kvtier.lab.eval.allocate import AllocTransform

    p = _page()
    energy = torch.ones(2, 2, 16)
    energy[..., 3] = 50.0  # queries lean on the outlier channel
    spec = QuantSpec(bits=4, k_group=16, v_group=16, sink_tokens=1)
    alloc = AllocTransform(spec, energy).roundtrip(p)
    uni = quantize_page(p.k, p.v, 0, spec)

    def weighted(k: torch.Tensor) -> float:
        return float(((k.float() - p.k.float()).square() * energy[:, None]).mean())

    assert weighted(alloc.page.k) < weighted(uni.k)
    assert torch.equal(alloc.page.k[:, :1], p.k[:, :1])  # the sink stays as put
    assert alloc.nbytes == pytest.approx(uni.nbytes, rel=0.05)  # same budget + allocation map
