"""The whole quality evaluation as one call: main codecs, passkey, ablation, research.

The CLI (``kvtier eval quality``) parses options, loads the model and text, and calls
:func:`evaluate`; tests call it with a tiny model built in code.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvtier.errors import InvalidArgument
from kvtier.lab.eval.catalog import Catalog, ablation, research
from kvtier.lab.eval.harness import QualityReport, page_from_cache, run_quality
from kvtier.lab.eval.passkey import PasskeyResult, run_passkey
from kvtier.lab.eval.report import markdown_table, to_json
from kvtier.lab.eval.research import pca_basis
from kvtier.lab.eval.variant import Variant

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Options:
    """What to evaluate. ``batch`` caps the variants run side by side (memory: one KV cache
    of the whole sequence per variant)."""

    codecs: tuple[str, ...]
    page_tokens: int = 256
    kv_dtype: torch.dtype = torch.float16
    ablation: bool = False
    research: bool = False
    passkey_trials: int = 20
    passkey_tokens: int = 1024
    passkey_codecs: tuple[str, ...] = ("int4", "int4a")
    batch: int = 6
    progress: bool = True


@dataclass(frozen=True, slots=True)
class Evaluation:
    """Everything one evaluation measured."""

    main: QualityReport
    passkey: PasskeyResult | None
    ablation: QualityReport | None
    research: QualityReport | None

    def json(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        return to_json(self.main, passkey=self.passkey, ablation=self.ablation,
                       research=self.research, extra=extra)

    def markdown(self) -> str:
        parts = [markdown_table(self.main.results, "codecs")]
        if self.passkey is not None:
            acc = ", ".join(f"{k} {100 * v:.1f}%" for k, v in self.passkey.accuracy.items())
            parts.append(f"passkey ({self.passkey.trials} trials, "
                         f"{self.passkey.context_tokens}-token context): {acc}")
        if self.ablation is not None:
            parts.append(markdown_table(self.ablation.results, "protection ablation (int4)"))
        if self.research is not None:
            parts.append(markdown_table(self.research.results, "research codecs"))
        return "\n\n".join(parts)


def _batched(model: Any, ids: torch.Tensor, variants: Sequence[Variant],
             opts: Options) -> QualityReport:
    """Run variants in batches of ``opts.batch`` (each batch recomputes the reference)."""
    if opts.batch < 1:
        raise InvalidArgument(f"batch must be >= 1, got {opts.batch}", field="batch")
    reports = [
        run_quality(model, ids, variants[i:i + opts.batch], page_tokens=opts.page_tokens,
                    kv_dtype=opts.kv_dtype, progress=opts.progress)
        for i in range(0, len(variants), opts.batch)
    ]
    return QualityReport(tokens=reports[0].tokens, page_tokens=reports[0].page_tokens,
                         ppl_ref=reports[0].ppl_ref,
                         results=tuple(r for rep in reports for r in rep.results))


def calibrate_values(model: Any, calib_ids: torch.Tensor) -> torch.Tensor:
    """PCA bases of the values from one forward over calibration tokens (not the eval text)."""
    with torch.inference_mode():
        device = next(model.parameters()).device
        out = model(input_ids=calib_ids.to(device)[None], use_cache=True)
        page = page_from_cache(out.past_key_values, 0, int(calib_ids.numel()), torch.float32)
    return pca_basis(page.v)


def evaluate(model: Any, tokenizer: Any, ids: torch.Tensor, opts: Options, *,
             catalog: Catalog | None = None,
             calib_ids: torch.Tensor | None = None) -> Evaluation:
    """Run everything ``opts`` asks for on ``ids``; ``tokenizer`` is needed for passkey."""
    cat = catalog or Catalog()
    variants = [cat.variant(name) for name in opts.codecs]
    main = _batched(model, ids, variants, opts)
    passkey = None
    if opts.passkey_trials > 0:
        names = ("none", *(c for c in opts.passkey_codecs if c != "none"))
        transforms = {name: cat.transform(name) for name in names}
        passkey = run_passkey(model, tokenizer, transforms, trials=opts.passkey_trials,
                              context_tokens=opts.passkey_tokens, page_tokens=opts.page_tokens,
                              kv_dtype=opts.kv_dtype, progress=opts.progress)
    abl = _batched(model, ids, ablation(cat.q_energy), opts) if opts.ablation else None
    res = None
    if opts.research:
        basis = calibrate_values(model, calib_ids) if calib_ids is not None else None
        res = _batched(model, ids, research(basis), opts)
    return Evaluation(main=main, passkey=passkey, ablation=abl, research=res)
