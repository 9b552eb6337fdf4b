"""Quality metrics of a run against the reference run on the same tokens.

* KL: mean over scored positions of KL(P_ref || P_run) of the next-token distributions.
* top-1: share of scored positions whose argmax matches the reference's.
* PPL: exp of the mean negative log-likelihood of the actual next tokens.
* attention-output cosine: per layer, the mean over scored positions of the cosine similarity
  of the attention block's output (after ``o_proj``) with the reference's.

Sums are kept in float64 so that equal logits give exactly KL 0 and differences of 1e-6 are
still resolved over tens of thousands of positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True, slots=True)
class Scores:
    """Final metrics of one variant."""

    kl: float
    top1: float
    ppl: float
    cosine_per_layer: tuple[float, ...]
    positions: int

    @property
    def cosine_min(self) -> float:
        return min(self.cosine_per_layer) if self.cosine_per_layer else 1.0


@dataclass(slots=True)
class Accumulator:
    """Running sums for one variant; fed chunk by chunk, read once with :meth:`scores`."""

    kl_sum: float = 0.0
    agree: int = 0
    nll_sum: float = 0.0
    positions: int = 0
    cos_sum: list[float] = field(default_factory=list)

    def add(self, ref_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
            ref_attn: list[torch.Tensor], attn: list[torch.Tensor]) -> None:
        """Add positions: logits ``[T, vocab]``, targets ``[T]``, attention ``[T, hidden]``."""
        ref_lp = torch.log_softmax(ref_logits.double(), dim=-1)
        lp = torch.log_softmax(logits.double(), dim=-1)
        self.kl_sum += float((ref_lp.exp() * (ref_lp - lp)).sum())
        self.agree += int((ref_logits.argmax(-1) == logits.argmax(-1)).sum())
        self.nll_sum += float(-lp.gather(-1, targets[:, None]).sum())
        n = int(targets.shape[0])
        self.positions += n
        if not self.cos_sum:
            self.cos_sum = [0.0] * len(attn)
        for i, (r, a) in enumerate(zip(ref_attn, attn, strict=True)):
            r64, a64 = r[:n].double(), a[:n].double()
            cos = (r64 * a64).sum(-1) / (r64.norm(dim=-1) * a64.norm(dim=-1)).clamp_min(1e-30)
            self.cos_sum[i] += float(cos.sum())

    def scores(self) -> Scores:
        n = max(self.positions, 1)
        return Scores(
            kl=self.kl_sum / n,
            top1=self.agree / n,
            ppl=math.exp(self.nll_sum / n),
            cosine_per_layer=tuple(c / n for c in self.cos_sum),
            positions=self.positions,
        )
