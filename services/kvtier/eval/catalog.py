"""Named variants: what ``--codecs``, ``--ablation`` and ``--research`` evaluate.

Codec names:

* ``none``, ``int8``, ``int4``: the tier stack's real codecs (``kvtier.codecs``) with the
  configured :class:`~kvtier.config.CodecConfig`; bits come from the blob lengths.
* ``int4r``: the evaluation's protected 4-bit scheme (see :data:`INT4R`), the proposal for the
  cold tiers: keys per channel, values per token after a Hadamard rotation, MSE-clipped ranges,
  sink tokens and one outlier key channel in full precision.
* ``fp8``: float8 e4m3 (research, the 8-bit alternative).
* ``mixed`` (= ``mixed:0.15:0.35``): past pages placed as the tier stack would, the most recent
  15% as put, the next 35% int8, the rest int4. ``mixed:A:B`` sets the fractions;
  ``mixedr:A:B`` uses ``int4r`` as the coldest tier.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from kvtier.config import CodecConfig
from kvtier.errors import InvalidArgument
from kvtier.eval.quant import QuantSpec
from kvtier.eval.research import (
    Fp8Transform,
    GearTransform,
    HaarTransform,
    PcaVTransform,
)
from kvtier.eval.transforms import (
    CodecTransform,
    Identity,
    PageTransform,
    QuantTransform,
    codecs_available,
)
from kvtier.eval.variant import Variant, uniform
from kvtier.types import Codec

DEFAULT_CODECS = ("none", "int8", "int4", "int4r", "mixed", "mixedr:0.10:0.30")

INT4R = QuantSpec(bits=4, sink_tokens=4, outlier_channels=1, rotate_v=True, clip=True)
"""The protected 4-bit setting proposed for the cold tiers (chosen by the ablation)."""


@dataclass(frozen=True, slots=True)
class Catalog:
    """Builds variants by name; ``params`` is the deployment's codec configuration."""

    params: CodecConfig = CodecConfig()
    use_codecs: bool = True

    def transform(self, name: str) -> PageTransform:
        """A single-tier transform by codec name."""
        real = self.use_codecs and codecs_available()
        if name == "none":
            return CodecTransform(Codec.NONE, self.params, "none") if real else Identity()
        if name in ("int8", "int4"):
            codec = Codec(name)
            if real:
                return CodecTransform(codec, self.params, name)
            n_out = max(self.params.min_outlier_channels, 0)
            return QuantTransform(
                QuantSpec(bits=codec.bits, k_group=self.params.group_size,
                          v_group=self.params.group_size, sink_tokens=self.params.sink_tokens,
                          outlier_channels=n_out), name)
        if name == "int4r":
            return QuantTransform(INT4R, name)
        if name == "fp8":
            return Fp8Transform(name=name)
        raise InvalidArgument(
            f"unknown codec {name!r}; use none, int8, int4, int4r, fp8, mixed[:A:B] or "
            f"mixedr[:A:B]", field="codecs")

    def variant(self, name: str) -> Variant:
        """A variant by ``--codecs`` name (see the module docstring)."""
        head, _, rest = name.partition(":")
        if head in ("mixed", "mixedr"):
            fractions = (0.15, 0.35)
            if rest:
                try:
                    a, b = (float(x) for x in rest.split(":"))
                except ValueError:
                    raise InvalidArgument(
                        f"{name!r}: write mixed:A:B with two fractions, e.g. mixed:0.15:0.35",
                        field="codecs") from None
                fractions = (a, b)
            cold = "int4r" if head == "mixedr" else "int4"
            tiers = (self.transform("none"), self.transform("int8"), self.transform(cold))
            return Variant(name=name, tiers=tiers, fractions=fractions)
        return uniform(self.transform(name))


def ablation() -> list[Variant]:
    """The protection ablation: one protection at a time, then the combinations."""
    base = QuantSpec(bits=4)
    rows: list[tuple[str, QuantSpec, int]] = [
        ("int4 G64 per-token K", replace(base, k_per_channel=False), 0),
        ("int4 G64 per-channel K", base, 0),
        ("+ 4 sinks", replace(base, sink_tokens=4), 0),
        ("+ 4 sinks + 1 outlier ch", replace(base, sink_tokens=4, outlier_channels=1), 0),
        ("+ 4 sinks + 2 outlier ch, G32",
         replace(base, sink_tokens=4, outlier_channels=2, k_group=32, v_group=32), 0),
        ("+ 4 sinks + 1 outlier + clip", replace(base, sink_tokens=4, outlier_channels=1,
                                                 clip=True), 0),
        ("+ 4 sinks + 1 outlier + V rotation", replace(base, sink_tokens=4, outlier_channels=1,
                                                       rotate_v=True), 0),
        ("int4r (sinks, outlier, V rot, clip)", INT4R, 0),
        ("int4r, K per-token rotated", replace(INT4R, k_per_channel=False, rotate_k=True,
                                               outlier_channels=0), 0),
        ("int4r, 8-bit metadata G32", replace(INT4R, k_group=32, v_group=32, meta_bits=8), 0),
        ("int4r + 64-token fp16 window", INT4R, 64),
    ]
    return [uniform(QuantTransform(spec, label), window=w) for label, spec, w in rows]


def research(v_basis: torch.Tensor | None) -> list[Variant]:
    """The seeds' research codecs, each next to the 4/8-bit setting of about its bits."""
    int4 = QuantSpec(bits=4, sink_tokens=4, outlier_channels=1)
    out: list[PageTransform] = [
        QuantTransform(QuantSpec(bits=8, k_group=128, v_group=64), "int8 (G128 K)"),
        Fp8Transform(name="fp8 e4m3 G64"),
        QuantTransform(int4, "int4 G64 +sinks+outlier"),
        HaarTransform(replace(int4, sink_tokens=0), levels=3, name="haar3 + int4 G64"),
        GearTransform(replace(int4, k_group=128), rank=1, name="gear int4 G128 + rank1"),
        QuantTransform(replace(int4, k_group=32, v_group=32), "int4 G32 +sinks+outlier"),
        GearTransform(replace(int4, bits=3, k_group=32, v_group=32), rank=2,
                      name="gear int3 G32 + rank2"),
    ]
    if v_basis is not None:
        out += [
            PcaVTransform(replace(int4, v_group=56), v_basis, rank=56, name="pca-v r56 + int4"),
            PcaVTransform(replace(int4, bits=5, v_group=48), v_basis, rank=48,
                          name="pca-v r48 + int5"),
        ]
    return [uniform(t) for t in out]
