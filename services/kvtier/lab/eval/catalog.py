"""Named variants: what ``--codecs``, ``--ablation`` and ``--research`` evaluate.

Codec names:

* ``none``, ``int8``, ``int4``, ``int4a``: the tier stack's real codecs (``kvtier.codecs``) with
  the configured :class:`~kvtier.config.CodecConfig`; bits come from the blob lengths. ``int4a``
  is the protected 4-bit codec of the cold tiers: key bits allocated per channel (2, 4 or 8,
  4 on average) by each channel's quantization step, on the int8 grid (see
  :mod:`kvtier.codecs.int4a`).
* ``int4q``: the evaluation's calibrated prototype (:data:`INT4Q`): key bits 2..8 allocated
  by calibrated query energy x key range (groups of 128 tokens), values per token after a
  Hadamard rotation, 4 sink tokens in full precision. Needs ``q_energy`` (see
  :func:`kvtier.lab.eval.allocate.query_energy`).
* ``int4r``: the best uniform setting without calibration (:data:`INT4R`): keys per channel
  with one outlier channel, values rotated, 4 sinks.
* ``fp8``: float8 e4m3 (research, the 8-bit alternative).
* ``mixed`` (= ``mixed:0.15:0.35``): past pages placed as the default tier stack would, the
  most recent 15% as put, the next 35% int8, the rest int4a. ``mixed:A:B`` sets the fractions;
  ``mixed4:A:B`` uses ``int4`` as the coldest tier.
* ``int3``: the deep tier's codec (:mod:`kvtier.codecs.int3`), about 3 bits an element.
  ``mixed3:A:B:C`` (= ``mixed3:0.10:0.30:0.30``) places past pages over ``hot -> int8 -> int4a
  -> int3``: the most recent A as put, the next B int8, the next C int4a, the rest int3.
* ``group-pos:BITS`` / ``group-sem:BITS``: the prototype quantizer at BITS (groups of
  ``group_size``, the configured sinks, one outlier channel) with key groups formed by
  position / by similarity (:class:`~kvtier.lab.eval.research.SemanticTransform`).
* ``imp-SIGNAL[:A:B]``: ``mixed[:A:B]``'s tiers and counts, but a simulated mover demotes the
  least important page of a full tier by ``SIGNAL`` (``keynorm`` or ``attn``, see
  :mod:`kvtier.lab.eval.placement`); ``hyb-SIGNAL[:A:B]`` keeps the fp16 tier by age and uses
  the signal below it. Same average bits as ``mixed[:A:B]``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from kvtier.config import CodecConfig
from kvtier.errors import InvalidArgument
from kvtier.lab.eval.allocate import AllocTransform
from kvtier.lab.eval.placement import SIGNALS
from kvtier.lab.eval.quant import QuantSpec
from kvtier.lab.eval.research import (
    Fp8Transform,
    GearTransform,
    HaarTransform,
    PcaVTransform,
    SemanticTransform,
)
from kvtier.lab.eval.transforms import (
    CodecTransform,
    Identity,
    PageTransform,
    QuantTransform,
    codecs_available,
)
from kvtier.lab.eval.variant import Variant, uniform
from kvtier.types import Codec

DEFAULT_CODECS = ("none", "int8", "int4", "int4a", "mixed", "mixed:0.10:0.30")

INT4R = QuantSpec(bits=4, sink_tokens=4, outlier_channels=1, rotate_v=True)
"""The best uncalibrated 4-bit setting of the ablation."""

INT4Q = QuantSpec(bits=4, sink_tokens=4, rotate_v=True, k_group=128)
"""The calibrated 4-bit prototype: with :class:`~kvtier.lab.eval.allocate.AllocTransform` key
bits."""


@dataclass(frozen=True, slots=True)
class Catalog:
    """Builds variants by name; ``params`` is the deployment's codec configuration."""

    params: CodecConfig = CodecConfig()
    use_codecs: bool = True
    q_energy: torch.Tensor | None = None  # [layers, kv_heads, head_dim], for int4q

    def transform(self, name: str) -> PageTransform:
        """A single-tier transform by codec name."""
        real = self.use_codecs and codecs_available()
        if name == "none":
            return CodecTransform(Codec.NONE, self.params, "none") if real else Identity()
        if name in ("int8", "int4", "int4a", "int3"):
            codec = Codec(name)
            if real:
                return CodecTransform(codec, self.params, name)
            if codec in (Codec.INT4A, Codec.INT3):
                raise InvalidArgument(f"{name} is a tier codec only (kvtier.codecs)",
                                      field="codecs")
            n_out = max(self.params.min_outlier_channels, 0)
            return QuantTransform(
                QuantSpec(bits=codec.bits, k_group=self.params.group_size,
                          v_group=self.params.group_size, sink_tokens=self.params.sink_tokens,
                          outlier_channels=n_out), name)
        if name == "int4r":
            return QuantTransform(INT4R, name)
        if name == "int4q":
            if self.q_energy is None:
                raise InvalidArgument("int4q needs calibrated query energy (q_energy)",
                                      field="codecs")
            return AllocTransform(INT4Q, self.q_energy, name=name)
        if name == "fp8":
            return Fp8Transform(name=name)
        head, _, arg = name.partition(":")
        if head in ("group-pos", "group-sem") and arg in ("2", "3", "4", "5", "6", "8"):
            spec = QuantSpec(bits=int(arg), sink_tokens=self.params.sink_tokens,
                             outlier_channels=1, k_group=self.params.group_size,
                             v_group=self.params.group_size)
            if head == "group-pos":
                return QuantTransform(spec, name)
            return SemanticTransform(spec, name)
        raise InvalidArgument(
            f"unknown codec {name!r}; use none, int8, int4, int4a, int3, int4q, int4r, fp8, "
            f"group-pos:BITS, group-sem:BITS, "
            f"mixed[:A:B], mixed4[:A:B], mixed3[:A:B:C], imp-SIGNAL[:A:B] or hyb-SIGNAL[:A:B] "
            f"(SIGNAL: {' or '.join(SIGNALS)})", field="codecs")

    def variant(self, name: str) -> Variant:
        """A variant by ``--codecs`` name (see the module docstring)."""
        head, _, rest = name.partition(":")
        if head == "mixed3":
            fractions3 = (0.10, 0.30, 0.30)
            if rest:
                try:
                    a, b, c = (float(x) for x in rest.split(":"))
                except ValueError:
                    raise InvalidArgument(
                        f"{name!r}: write mixed3:A:B:C with three fractions, e.g. "
                        f"mixed3:0.10:0.30:0.30", field="codecs") from None
                fractions3 = (a, b, c)
            tiers = tuple(self.transform(t) for t in ("none", "int8", "int4a", "int3"))
            return Variant(name=name, tiers=tiers, fractions=fractions3)
        if head.startswith(("imp-", "hyb-")) and head[4:] in SIGNALS:
            base = self.variant("mixed" + (":" + rest if rest else ""))
            return replace(base, name=name, placement=head[4:], hot_by_age=head[:3] == "hyb")
        if head in ("mixed", "mixed4"):
            fractions = (0.15, 0.35)
            if rest:
                try:
                    a, b = (float(x) for x in rest.split(":"))
                except ValueError:
                    raise InvalidArgument(
                        f"{name!r}: write mixed:A:B with two fractions, e.g. mixed:0.15:0.35",
                        field="codecs") from None
                fractions = (a, b)
            cold = "int4" if head == "mixed4" else "int4a"
            tiers = (self.transform("none"), self.transform("int8"), self.transform(cold))
            return Variant(name=name, tiers=tiers, fractions=fractions)
        return uniform(self.transform(name))


def ablation(q_energy: torch.Tensor | None) -> list[Variant]:
    """The protection ablation: one protection at a time, then the combinations."""
    base = QuantSpec(bits=4)
    s4o1 = replace(base, sink_tokens=4, outlier_channels=1)
    rows: list[tuple[str, QuantSpec, int]] = [
        ("int4 G64, per-token K", replace(base, k_per_channel=False), 0),
        ("int4 G64, per-channel K", base, 0),
        ("+ 4 sinks", replace(base, sink_tokens=4), 0),
        ("+ 4 sinks + 1 outlier ch", s4o1, 0),
        ("+ 4 sinks + 2 outlier ch, G32",
         replace(s4o1, outlier_channels=2, k_group=32, v_group=32), 0),
        ("+ 4 sinks + 1 outlier + MSE clip", replace(s4o1, clip=True), 0),
        ("+ 4 sinks + 1 outlier + pre-RoPE K", replace(s4o1, rope_theta=1e5), 0),
        ("int4r: + 4 sinks + 1 outlier + V Hadamard", INT4R, 0),
        ("int4r + 64-token fp16 window", INT4R, 64),
        ("K int4 only (V int8)", replace(s4o1, v_bits=8), 0),
        ("V int4 only (K int8)", replace(base, bits=8, v_bits=4, sink_tokens=4), 0),
    ]
    out: list[tuple[str, PageTransform, int]] = [
        (label, QuantTransform(spec, label), w) for label, spec, w in rows]
    if q_energy is not None:
        out += [
            ("K bits by key range (no calibration), G64",
             AllocTransform(replace(INT4Q, k_group=64), torch.ones_like(q_energy),
                            name="x"), 0),
            ("K bits by query energy x range, G64",
             AllocTransform(replace(INT4Q, k_group=64), q_energy, name="x"), 0),
            ("int4q: K bits by query energy x range, G128", AllocTransform(INT4Q, q_energy,
                                                                           name="x"), 0),
        ]
    if codecs_available():  # the tier codec's own settings
        out += [(label, CodecTransform(Codec.INT4A, params, label), 0) for label, params in (
            ("int4a (tier codec): K bits 2..8 by step x key peak, G64", CodecConfig()),
            ("int4a, no outlier channel",
             CodecConfig(min_outlier_channels=0, outlier_fraction=0.0)),
            ("int4a, key_bits 4.25", CodecConfig(key_bits=4.25)),
        )]
    return [Variant(name=label, tiers=(t,), window=w) for label, t, w in out]


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
