"""A variant: which transform each past page goes through, as a tier stack would place it.

Past pages are ranked by age (0 = the page just before the chunk being scored). The first
``fractions[0]`` of them (rounded) sit in ``tiers[0]``, the next ``fractions[1]`` in ``tiers[1]``
and so on; the rest sit in the last tier. A uniform variant is one tier and no fractions.
``window`` tokens just before the scored chunk stay as put, whatever their page's tier: the
"recent window in full precision" protection, a page property the tier stack can honour.

``placement`` other than ``"age"`` simulates a mover that demotes by page importance instead
(:mod:`kvtier.lab.eval.placement`): the same number of pages in each tier at every step as by
age (so the same average bits), but which pages go down is chosen by a signal, and a page never
comes back up (precision only goes down).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvtier.errors import InvalidArgument
from kvtier.lab.eval.transforms import PageTransform


@dataclass(frozen=True, slots=True)
class Variant:
    """One row of the evaluation: a name, its tiers (hottest first) and how pages are split."""

    name: str
    tiers: tuple[PageTransform, ...]
    fractions: tuple[float, ...] = ()
    window: int = 0
    placement: str = "age"  # or an importance signal (kvtier.lab.eval.placement.SIGNALS)
    hot_by_age: bool = False  # with a signal: the first tier still holds the newest pages

    def __post_init__(self) -> None:
        if not self.tiers:
            raise InvalidArgument(f"variant {self.name!r} has no tiers", field="tiers")
        if len(self.fractions) != len(self.tiers) - 1:
            raise InvalidArgument(
                f"variant {self.name!r}: {len(self.tiers)} tiers need {len(self.tiers) - 1} "
                f"fractions, got {len(self.fractions)}", field="fractions")
        if any(f < 0 for f in self.fractions) or sum(self.fractions) > 1.0 + 1e-9:
            raise InvalidArgument(
                f"variant {self.name!r}: fractions {self.fractions} must be >= 0 and sum to "
                f"at most 1", field="fractions")
        if self.window < 0:
            raise InvalidArgument(f"window must be >= 0, got {self.window}", field="window")

    def counts(self, n_past: int) -> list[int]:
        """Pages in each tier when ``n_past`` pages are placed by age (as :meth:`tier_of`)."""
        out = [0] * len(self.tiers)
        for age in range(n_past):
            out[self.tier_of(age, n_past)] += 1
        return out

    def tier_of(self, age: int, n_past: int) -> int:
        """Index into :attr:`tiers` of the page ``age`` pages before the scored chunk."""
        edge = 0.0
        for i, f in enumerate(self.fractions):
            edge += f
            if age < int(edge * n_past + 0.5):
                return i
        return len(self.tiers) - 1


def uniform(transform: PageTransform, name: str | None = None, window: int = 0) -> Variant:
    """Every past page through one transform."""
    return Variant(name=name or transform.name, tiers=(transform,), window=window)
