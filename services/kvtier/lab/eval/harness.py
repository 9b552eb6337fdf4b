"""Chunked, teacher-forced prefill with the KV cache of earlier pages stored and read back.

The token sequence is cut into pages of ``page_tokens``. Page ``i`` is scored by one forward
pass over its tokens with the cache of pages ``0..i-1``; before that pass, every earlier page
has gone through the variant's transform for the tier its age puts it in (see
:class:`kvtier.lab.eval.variant.Variant`). The reference run does the same with the pages stored as
put, so a variant is compared with the unquantized run on exactly the same tokens. All variants
advance in lockstep, one page at a time, so reference logits never need to be kept for the
whole sequence (8,192 x 49,152 floats would be 1.6 GB).

Keys and values are post-RoPE, as the model caches them (``DynamicCache``). Pages are handed to
the transforms in ``kv_dtype`` (float16 by default: what the hot tier holds when the worker puts
fp16 KV); the reference run rounds its pages to the same dtype, so the ``none`` codec must give
exactly the reference result. The first page has no past and is not scored.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from kvtier.errors import InvalidArgument
from kvtier.lab.eval.metrics import Accumulator, Scores
from kvtier.lab.eval.placement import AttentionProbe, Mover, keynorm_importance
from kvtier.lab.eval.transforms import Identity, Roundtrip
from kvtier.lab.eval.variant import Variant, uniform
from kvtier.types import Page

log = logging.getLogger(__name__)
ATTN_DECAY = 0.5  # the attention signal: score = decay * score + the last pass's mass


@dataclass(frozen=True, slots=True)
class VariantResult:
    """Metrics of one variant against the reference, and its storage cost."""

    name: str
    scores: Scores
    ppl_ref: float
    bits_per_element: float

    @property
    def delta_pct(self) -> float:
        return (self.scores.ppl / self.ppl_ref - 1.0) * 100.0


@dataclass(frozen=True, slots=True)
class QualityReport:
    """The reference run's perplexity and one result per variant, in the order given."""

    tokens: int
    page_tokens: int
    ppl_ref: float
    results: tuple[VariantResult, ...]


class AttentionTap:
    """Forward hooks that capture each layer's attention output for the current pass."""

    def __init__(self, model: Any) -> None:
        self.outputs: list[torch.Tensor] = []
        self._handles = [
            layer.self_attn.register_forward_hook(self._hook) for layer in _layers(model)
        ]

    def _hook(self, module: Any, args: Any, output: Any) -> None:
        out = output[0] if isinstance(output, tuple) else output
        self.outputs.append(out[0].detach())

    def take(self) -> list[torch.Tensor]:
        out, self.outputs = self.outputs, []
        return out

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def _layers(model: Any) -> Sequence[Any]:
    return model.model.layers  # type: ignore[no-any-return]


def page_from_cache(cache: Any, start: int, end: int, dtype: torch.dtype) -> Page:
    """Positions ``start:end`` of a DynamicCache as a Page ``[layers, tokens, heads, dim]``."""
    k = torch.stack([layer.keys[0, :, start:end] for layer in cache.layers])
    v = torch.stack([layer.values[0, :, start:end] for layer in cache.layers])
    return Page(k=k.permute(0, 2, 1, 3).to(dtype), v=v.permute(0, 2, 1, 3).to(dtype),
                start_position=start)


def write_page(cache: Any, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
    """Overwrite positions ``start:start+tokens`` of a DynamicCache in place."""
    end = start + k.shape[1]
    for i, layer in enumerate(cache.layers):
        layer.keys[0, :, start:end] = k[i].permute(1, 0, 2).to(layer.keys.dtype)
        layer.values[0, :, start:end] = v[i].permute(1, 0, 2).to(layer.values.dtype)


@dataclass(slots=True)
class _Run:
    """Mutable per-variant state inside one evaluation."""

    variant: Variant
    cache: Any = None
    raw: dict[int, Page] = field(default_factory=dict)
    placed: dict[int, tuple[int, int]] = field(default_factory=dict)  # page -> (tier, raw from)
    nbytes: dict[int, tuple[int, int]] = field(default_factory=dict)  # page -> (tier, bytes)
    acc: Accumulator = field(default_factory=Accumulator)
    numel: int = 0  # elements of one K (or V) page tensor
    importance: dict[int, float] = field(default_factory=dict)  # page -> signal (placement)
    mover: Mover | None = None

    def tiers(self, n_past: int) -> dict[int, int]:
        """The tier of each of pages ``0..n_past-1`` with ``n_past`` pages placed."""
        var = self.variant
        if var.placement == "age":
            return {j: var.tier_of(n_past - 1 - j, n_past) for j in range(n_past)}
        if self.mover is None:
            self.mover = Mover(var)
        return self.mover.step(n_past, self.importance)

    def observe(self, i: int, probe: AttentionProbe | None, page_tokens: int) -> None:
        """Update the importance signal after page ``i``'s forward pass."""
        var = self.variant
        if var.placement == "keynorm":
            self.importance[i] = keynorm_importance(self.raw[i])
        elif var.placement == "attn" and probe is not None:
            mass = probe.mass(self.cache, page_tokens)
            for j in range(int(mass.numel())):
                self.importance[j] = ATTN_DECAY * self.importance.get(j, 0.0) + float(mass[j])

    def store(self, i: int, page_tokens: int, n_past: int) -> None:
        """Place every past page for scoring page ``n_past`` (pages ``0..n_past-1``)."""
        var = self.variant
        window_from = n_past * page_tokens - var.window
        placed = self.tiers(n_past)
        for j in range(n_past):
            tier = placed[j]
            start = j * page_tokens
            raw_from = min(max(window_from - start, 0), page_tokens)
            if self.placed.get(j) == (tier, raw_from):
                continue
            raw = self.raw[j]
            rt = self._roundtrip(j, tier, raw)
            k, v = rt.page.k, rt.page.v
            if raw_from < page_tokens:
                k, v = k.clone(), v.clone()
                k[:, raw_from:] = raw.k[:, raw_from:]
                v[:, raw_from:] = raw.v[:, raw_from:]
            write_page(self.cache, start, k, v)
            self.placed[j] = (tier, raw_from)
            if len(var.tiers) == 1 and raw_from >= page_tokens:
                del self.raw[j]  # final: a uniform page never changes again

    def _roundtrip(self, j: int, tier: int, raw: Page) -> Roundtrip:
        rt = self.variant.tiers[tier].roundtrip(raw)
        self.nbytes[j] = (tier, rt.nbytes)
        return rt

    def bits_per_element(self, n_pages: int, page_tokens: int, elem_bytes: int) -> float:
        """Average stored bits per K/V element with the whole sequence placed as at the end.

        Pages are charged what their final tier's stored form takes (all metadata counted);
        tokens inside the recent window are charged as put (``elem_bytes`` per element).
        """
        var = self.variant
        total_bits = 0.0
        final = self.tiers(n_pages)
        for j in range(n_pages):
            tier = final[j]
            if self.nbytes.get(j, (-1, 0))[0] != tier:
                if j not in self.raw:
                    raise AssertionError(f"page {j} was dropped before its final placement")
                self._roundtrip(j, tier, self.raw[j])
            keep = min(max(var.window - (n_pages - 1 - j) * page_tokens, 0), page_tokens)
            stored_bits = 8.0 * self.nbytes[j][1]
            total_bits += stored_bits * (page_tokens - keep) / page_tokens
            total_bits += 8.0 * elem_bytes * self.numel * 2 * keep / page_tokens
        return total_bits / (n_pages * self.numel * 2)


def run_quality(model: Any, ids: torch.Tensor, variants: Sequence[Variant], *,
                page_tokens: int = 256, kv_dtype: torch.dtype = torch.float16,
                progress: bool = True) -> QualityReport:
    """Score ``ids`` (``[tokens]``) page by page for the reference and every variant.

    ``ids`` must hold at least two pages; a trailing partial page is dropped.
    """
    if page_tokens < 1:
        raise InvalidArgument(f"page_tokens must be >= 1, got {page_tokens}", field="page_tokens")
    n_pages = int(ids.numel()) // page_tokens
    if n_pages < 2:
        raise InvalidArgument(
            f"need at least 2 pages of {page_tokens} tokens, got {ids.numel()} tokens",
            field="tokens")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise InvalidArgument(f"variant names must be unique, got {names}", field="codecs")
    device = next(model.parameters()).device
    ids = ids[: n_pages * page_tokens].to(device)
    ref = _Run(uniform(Identity(name="reference")))
    runs = [_Run(v) for v in variants]
    elem_bytes = torch.empty((), dtype=kv_dtype).element_size()
    tap = AttentionTap(model)
    probe = AttentionProbe(model) if any(v.placement == "attn" for v in variants) else None
    bar = tqdm(total=(n_pages - 1) * (len(runs) + 1), disable=not progress,
               desc="eval quality", unit="fwd")
    try:
        with torch.inference_mode():
            for i in range(n_pages):
                chunk = ids[i * page_tokens:(i + 1) * page_tokens][None]
                targets = ids[i * page_tokens + 1:(i + 1) * page_tokens + 1]
                ref_logits, ref_attn = _step(model, tap, ref, chunk, i, page_tokens, kv_dtype,
                                             probe)
                if i == 0:
                    first = ref.raw[0]
                    for run in runs:
                        run.cache = _clone_cache(ref.cache)
                        run.raw[0] = first
                        run.numel = first.k.numel()
                        run.observe(0, probe, page_tokens)
                    continue
                bar.update(1)
                for run in runs:
                    logits, attn = _step(model, tap, run, chunk, i, page_tokens, kv_dtype,
                                         probe)
                    run.acc.add(ref_logits[: targets.numel()], logits[: targets.numel()],
                                targets, ref_attn, attn)
                    bar.update(1)
                ref.acc.add(ref_logits[: targets.numel()], ref_logits[: targets.numel()],
                            targets, ref_attn, ref_attn)
    finally:
        bar.close()
        tap.close()
        if probe is not None:
            probe.close()
    ref_scores = ref.acc.scores()
    results = []
    for run in runs:
        bits = run.bits_per_element(n_pages, page_tokens, elem_bytes)
        results.append(VariantResult(run.variant.name, run.acc.scores(), ref_scores.ppl, bits))
        log.info("%s: KL %.6f top-1 %.4f PPL %.4f bits %.3f", run.variant.name,
                 results[-1].scores.kl, results[-1].scores.top1, results[-1].scores.ppl, bits)
    return QualityReport(tokens=n_pages * page_tokens, page_tokens=page_tokens,
                         ppl_ref=ref_scores.ppl, results=tuple(results))


def _step(model: Any, tap: AttentionTap, run: _Run, chunk: torch.Tensor, i: int,
          page_tokens: int, kv_dtype: torch.dtype,
          probe: AttentionProbe | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Store the past pages, score page ``i``, keep its raw KV; return logits and attention."""
    if i > 0:
        run.store(i, page_tokens, i)
    tap.take()
    if probe is not None:
        probe.clear()
    out = model(input_ids=chunk, past_key_values=run.cache, use_cache=True)
    run.cache = out.past_key_values
    run.raw[i] = page_from_cache(run.cache, i * page_tokens, (i + 1) * page_tokens, kv_dtype)
    run.numel = run.raw[i].k.numel()
    run.observe(i, probe, page_tokens)
    return out.logits[0].float(), tap.take()


def _clone_cache(cache: Any) -> Any:
    """A deep copy of a DynamicCache (each run owns and mutates its own)."""
    import copy

    return copy.deepcopy(cache)
