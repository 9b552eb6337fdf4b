"""Passkey retrieval: a number hidden early in filler text, asked for at the end.

Each trial builds a context of whole pages: an instruction, repeated filler sentences and, at a
random depth in the first 10-40% of the context, ``The pass key is NNNNN.``. The context is
prefilled once at full precision (the way a worker computes a page before handing it to the
cache); then, for each transform, every context page is stored and read back (so the pages
holding the needle sit in, say, the int4 tier) and the question is scored with that cache,
teacher-forced: a trial succeeds when the model's argmax reproduces every token of the answer,
which is exactly when greedy decoding would answer correctly.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from kvtier.errors import InvalidArgument
from kvtier.lab.eval.harness import page_from_cache, write_page
from kvtier.lab.eval.transforms import PageTransform

INSTRUCTION = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the important information there.\n"
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass(frozen=True, slots=True)
class PasskeyResult:
    """Accuracy per transform over the same trials (same keys, depths and contexts)."""

    trials: int
    context_tokens: int
    accuracy: Mapping[str, float]


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def build_trial(tokenizer: Any, key: int, depth: float,
                context_tokens: int) -> tuple[list[int], list[int], list[int]]:
    """``(context, question, answer)`` token ids; the context is exactly ``context_tokens``."""
    head = _encode(tokenizer, INSTRUCTION)
    filler = _encode(tokenizer, FILLER)
    needle = _encode(tokenizer, NEEDLE.format(key=key))
    room = context_tokens - len(head) - len(needle)
    if room < len(filler):
        raise InvalidArgument(
            f"passkey context of {context_tokens} tokens is too short for the prompt",
            field="passkey_tokens")
    body = (filler * (room // len(filler) + 2))[:room]
    at = int(depth * room)
    # Put the needle on a sentence boundary of the filler so the text stays well-formed.
    at -= at % len(filler)
    context = head + body[:at] + needle + body[at:]
    return context, _encode(tokenizer, QUESTION), _encode(tokenizer, f" {key}")


def run_passkey(model: Any, tokenizer: Any, transforms: Mapping[str, PageTransform], *,
                trials: int = 20, context_tokens: int = 1024, page_tokens: int = 256,
                kv_dtype: torch.dtype = torch.float16, seed: int = 0,
                progress: bool = True) -> PasskeyResult:
    """Accuracy of each transform on ``trials`` passkey prompts (the same prompts for each)."""
    if trials < 1:
        raise InvalidArgument(f"trials must be >= 1, got {trials}", field="passkey_trials")
    if context_tokens < page_tokens or context_tokens % page_tokens:
        raise InvalidArgument(
            f"passkey context ({context_tokens} tokens) must be a positive multiple of the "
            f"page size {page_tokens}", field="passkey_tokens")
    rng = random.Random(seed)
    device = next(model.parameters()).device
    hits = dict.fromkeys(transforms, 0)
    bar = tqdm(total=trials, disable=not progress, desc="passkey", unit="trial")
    try:
        with torch.inference_mode():
            for _ in range(trials):
                key = rng.randrange(10000, 100000)
                context, question, answer = build_trial(
                    tokenizer, key, rng.uniform(0.1, 0.4), context_tokens)
                ctx = torch.tensor(context, device=device)[None]
                out = model(input_ids=ctx, use_cache=True)
                pages = [page_from_cache(out.past_key_values, s, s + page_tokens, kv_dtype)
                         for s in range(0, context_tokens, page_tokens)]
                tail = torch.tensor(question + answer, device=device)[None]
                want = torch.tensor(answer, device=device)
                for name, transform in transforms.items():
                    cache = copy.deepcopy(out.past_key_values)
                    for page in pages:
                        rt = transform.roundtrip(page)
                        write_page(cache, page.start_position, rt.page.k, rt.page.v)
                    logits = model(input_ids=tail, past_key_values=cache, use_cache=True).logits
                    pred = logits[0, len(question) - 1: len(question) - 1 + len(answer)].argmax(-1)
                    hits[name] += int(bool((pred == want).all()))
                bar.update(1)
    finally:
        bar.close()
    return PasskeyResult(trials=trials, context_tokens=context_tokens,
                         accuracy={name: h / trials for name, h in hits.items()})
