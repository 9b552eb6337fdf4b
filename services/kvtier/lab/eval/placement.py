"""Importance-aware placement: which pages a mover demotes when it chooses by page importance.

A tier stack placed by age (``mixed:A:B``) keeps the newest pages in the upper tiers. Here a
simulated mover keeps the same number of pages in every tier at every step (so the same
average bits), but when a tier is over its count it demotes the page of that tier with the
lowest importance, and a page never moves back up (precision only goes down). Two signals:

* ``keynorm``: the key L2 norm, what the daemon can compute at put time with no help from the
  worker. Low-norm keys draw more attention (a known attention-free proxy), so a page's
  importance is minus the mean over layers of the log of its mean key norm (a log so that no
  layer's scale dominates).
* ``attn``: the attention mass per page that a worker could report, measured on the last
  ``last`` query positions of each scored chunk (every layer and head, softmax over the whole
  causal context, summed per page), kept as a decaying sum (``score = decay * score + mass``)
  so that pages attended recently rank higher.

``hot_by_age`` keeps the first tier by age (the newest pages as put, as the policy's reuse
prediction would) and lets the signal choose among the lower tiers only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from kvtier.lab.eval.variant import Variant
from kvtier.types import Page

SIGNALS = ("keynorm", "attn")


def keynorm_importance(page: Page) -> float:
    """Minus the mean over layers of the log mean key L2 norm of a page (higher: more
    important)."""
    norms = page.k.float().norm(dim=-1).mean(dim=(1, 2))  # [layers]
    return -float(norms.clamp_min(1e-12).log().mean())


class Mover:
    """Per-page tiers of a variant placed by importance (see the module docstring)."""

    def __init__(self, variant: Variant) -> None:
        self.variant = variant
        self.tier: dict[int, int] = {}

    def step(self, n_past: int, importance: Mapping[int, float]) -> dict[int, int]:
        """Place pages ``0..n_past-1`` (the newest enters the first tier) and return the map."""
        var = self.variant
        for j in range(n_past):
            self.tier.setdefault(j, 0)
        cum = 0
        counts = var.counts(n_past)
        for t in range(len(var.tiers) - 1):
            cum += counts[t]
            while True:
                upper = [j for j, tt in self.tier.items() if tt <= t]
                if len(upper) <= cum:
                    break
                here = [j for j in upper if self.tier[j] == t]
                if t == 0 and var.hot_by_age:
                    victim = min(here)  # the oldest
                else:  # the least important; the older on a tie
                    victim = min(here, key=lambda j: (importance.get(j, 0.0), j))
                self.tier[victim] = t + 1
        return dict(self.tier)


class AttentionProbe:
    """Captures each attention layer's input of the last ``last`` positions of a forward
    pass, then measures the attention mass of those queries on each page of a cache."""

    def __init__(self, model: Any, last: int = 16) -> None:
        self.last = last
        self.layers = list(model.model.layers)
        self.inputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._handles = [layer.self_attn.register_forward_pre_hook(self._hook, with_kwargs=True)
                         for layer in self.layers]

    def _hook(self, module: Any, args: Any, kwargs: Any) -> None:
        h = kwargs.get("hidden_states", args[0] if args else None)
        cos, sin = kwargs["position_embeddings"]
        n = self.last
        self.inputs.append((h[:, -n:].detach(), cos[:, -n:].detach(), sin[:, -n:].detach()))

    def clear(self) -> None:
        self.inputs = []

    def mass(self, cache: Any, page_tokens: int) -> torch.Tensor:
        """``[pages]`` attention mass of the captured queries on each whole page of ``cache``
        (mean over layers, heads and queries), from the last forward pass."""
        total: torch.Tensor | None = None
        for idx, (layer, (h, cos, sin)) in enumerate(zip(self.layers, self.inputs, strict=True)):
            attn = layer.self_attn
            d = attn.head_dim
            q = attn.q_proj(h).view(1, h.shape[1], -1, d).transpose(1, 2).float()
            half = d // 2
            rot = torch.cat((-q[..., half:], q[..., :half]), dim=-1)
            q = q * cos[:, None].float() + rot * sin[:, None].float()
            keys = cache.layers[idx].keys.float()  # [1, Hkv, P, d]
            keys = keys.repeat_interleave(q.shape[1] // keys.shape[1], dim=1)
            logits = (q @ keys.transpose(-1, -2)) * attn.scaling
            P, n = keys.shape[2], q.shape[2]
            pos_q = torch.arange(P - n, P, device=q.device)[:, None]
            logits = logits.masked_fill(torch.arange(P, device=q.device)[None, :] > pos_q,
                                        float("-inf"))
            probs = logits.softmax(-1).mean(dim=(0, 1, 2))  # [P]
            pages = probs[: P // page_tokens * page_tokens].reshape(-1, page_tokens).sum(-1)
            total = pages if total is None else total + pages
        assert total is not None
        return total / len(self.layers)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
