"""Turning evaluation results into the ``--json`` object and Markdown tables."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvtier.lab.eval.harness import QualityReport, VariantResult
from kvtier.lab.eval.passkey import PasskeyResult


def markdown_table(results: Sequence[VariantResult], title: str) -> str:
    """``setting | KL | top-1 | PPL | dPPL | bits/elem | x vs fp16 | cos min`` rows."""
    lines = [
        f"### {title}",
        "",
        "| setting | KL | top-1 | PPL | ΔPPL | bits/elem | × vs fp16 | attn cos min |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        s = r.scores
        lines.append(
            f"| {r.name} | {s.kl:.6f} | {100 * s.top1:.2f}% | {s.ppl:.4f} | "
            f"{r.delta_pct:+.2f}% | {r.bits_per_element:.3f} | "
            f"{16.0 / r.bits_per_element:.2f} | {s.cosine_min:.5f} |")
    return "\n".join(lines)


def rows(results: Sequence[VariantResult]) -> list[dict[str, Any]]:
    """One JSON object per result (used for the ablation and research tables)."""
    return [
        {
            "setting": r.name,
            "kl": r.scores.kl,
            "top1": r.scores.top1,
            "ppl": r.scores.ppl,
            "delta_pct": r.delta_pct,
            "bits_per_element": r.bits_per_element,
            "cosine_min": r.scores.cosine_min,
        }
        for r in results
    ]


def to_json(main: QualityReport, *, passkey: PasskeyResult | None = None,
            ablation: QualityReport | None = None, research: QualityReport | None = None,
            extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``--json`` object: per-codec maps named in the issue, then the optional tables."""
    res = main.results
    out: dict[str, Any] = {
        "tokens": main.tokens,
        "page_tokens": main.page_tokens,
        "ppl_ref": main.ppl_ref,
        "kl": {r.name: r.scores.kl for r in res},
        "top1": {r.name: r.scores.top1 for r in res},
        "ppl": {r.name: r.scores.ppl for r in res},
        "delta_pct": {r.name: r.delta_pct for r in res},
        "bits_per_element": {r.name: r.bits_per_element for r in res},
        "cosine_min": {r.name: r.scores.cosine_min for r in res},
        "cosine_per_layer": {r.name: list(r.scores.cosine_per_layer) for r in res},
        "passkey_acc": dict(passkey.accuracy) if passkey else None,
        "passkey_trials": passkey.trials if passkey else 0,
    }
    if ablation is not None:
        out["ablation"] = rows(ablation.results)
    if research is not None:
        out["research"] = rows(research.results)
    if extra:
        out.update(extra)
    return out
