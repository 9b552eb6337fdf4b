"""The page mapping between a model's KV cache and kvtier pages, shared by every engine.

A kvtier page is ``page_tokens`` consecutive tokens of one sequence, every layer: ``k`` and ``v``
shaped ``[layers, tokens, kv_heads, head_dim]``, post-RoPE as the model caches them, with
``start_position`` the index of its first token. Engines keep KV per layer in their own order:
transformers as ``[batch, kv_heads, seq, head_dim]`` (heads-major), vLLM's paged blocks as
``[blocks, block_size, kv_heads, head_dim]`` (token-major). This module is the one place that
knows both sides:

- :class:`PageLayout`: a model's page shape, the keys of a prompt's pages, and the check that
  refuses a page that does not fit the model (:class:`LayoutMismatch` names what differs);
- :func:`write_pages` / :func:`read_page`: pages into per-layer heads-major buffers, and one
  page out of them, as strided copies that also convert the dtype and move between devices
  (no intermediate copies);
- :func:`model_fingerprint`: the model part of a page key, so two models never share pages.

Keys: page ``i`` of a prompt is keyed by the chained prefix hash of its tokens
(:func:`kvtier_client.prefix_keys`) with the chain's root salted by the tenant namespace and the
model fingerprint. Equal prompts of the same model share pages across workers and hosts.
Needs torch (the ``hf`` extra) for the tensor functions; the layout itself is plain Python.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvtier_client.keys import prefix_keys

PAGE_DTYPES = ("float16", "bfloat16", "float32")


class LayoutMismatch(ValueError):
    """A page that cannot be used by this model; the message names every field that differs."""


@dataclass(frozen=True, slots=True)
class PageLayout:
    """The shape of one model's pages and how a prompt's tokens map onto them.

    ``dtype`` is what pages are put in; ``accept`` the dtypes a fetched page may have (any of
    them is converted exactly into the model's cache dtype where that is wider, rounded where
    it is narrower). ``model_id`` salts the keys (see :func:`model_fingerprint`).
    """

    layers: int
    kv_heads: int
    head_dim: int
    page_tokens: int
    model_id: str
    dtype: str = "float16"
    accept: tuple[str, ...] = PAGE_DTYPES

    def __post_init__(self) -> None:
        for name in ("layers", "kv_heads", "head_dim", "page_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        unknown = [d for d in (self.dtype, *self.accept) if d not in PAGE_DTYPES]
        if unknown:
            raise ValueError(f"page dtypes must be among {', '.join(PAGE_DTYPES)}; "
                             f"got {', '.join(unknown)}")

    @property
    def page_shape(self) -> tuple[int, int, int, int]:
        return (self.layers, self.page_tokens, self.kv_heads, self.head_dim)

    def reusable_pages(self, prompt_tokens: int) -> int:
        """Full pages of a ``prompt_tokens`` prompt that may come from the cache: at least one
        token is always left to compute, since the model must run on something to give the
        next token's logits."""
        return max(prompt_tokens - 1, 0) // self.page_tokens

    def full_pages(self, tokens: int) -> int:
        return tokens // self.page_tokens

    def keys(self, token_ids: Sequence[int], namespace: str) -> list[bytes]:
        """Keys of every full page of ``token_ids`` (a trailing partial page gets none)."""
        return prefix_keys(token_ids, self.page_tokens, namespace=f"{namespace}\x1f{self.model_id}")

    def check(self, index: int, shape: Sequence[int], dtype: str, start_position: int) -> None:
        """Raise :class:`LayoutMismatch` unless page ``index`` of a prompt fits this model."""
        problems = []
        if len(shape) != 4:
            problems.append(f"shape {list(shape)} is not [layers, tokens, kv_heads, head_dim]")
        else:
            for name, got, want in zip(("layers", "tokens", "kv_heads", "head_dim"), shape,
                                       self.page_shape):
                if got != want:
                    problems.append(f"{name} {got} != {want}")
        if dtype not in self.accept:
            problems.append(f"dtype {dtype} not in {', '.join(self.accept)}")
        if start_position != index * self.page_tokens:
            problems.append(f"start_position {start_position} != {index * self.page_tokens}")
        if problems:
            raise LayoutMismatch(f"page {index} does not fit the model: " + "; ".join(problems))


def model_fingerprint(config: Mapping[str, Any], samples: Sequence[bytes]) -> str:
    """A short stable id of a model: its architecture fields and a few bytes of its weights.

    ``config`` holds the fields that shape the KV cache (layer count, heads, head dim, rotary
    settings, ...); ``samples`` a few leading values of each weight tensor, rounded to bfloat16
    by the caller so that float32 and bfloat16 copies of one checkpoint agree. A fine-tune with
    the same architecture gets another id, so it never reads a base model's pages.
    """
    h = hashlib.blake2b(digest_size=12, person=b"kvtier-model")
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for s in samples:
        h.update(len(s).to_bytes(8, "little"))
        h.update(s)
    return h.hexdigest()


def torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


def write_pages(dst_k: Sequence[Any], dst_v: Sequence[Any], pages: Sequence[tuple[Any, Any]],
                first_token: int = 0) -> None:
    """Copy pages into per-layer heads-major buffers.

    ``dst_k``/``dst_v``: one tensor ``[kv_heads, capacity, head_dim]`` per layer (any dtype and
    device, any strides); ``pages``: ``(k, v)`` tensors ``[layers, tokens, kv_heads,
    head_dim]``, laid one after the other from token ``first_token``. Every (layer, page) slice
    is one strided copy that transposes, converts and places it, all issued in one batched call;
    a page on another device is moved first, in its own (narrower) dtype.
    """
    import torch

    dsts, srcs = [], []
    start = first_token
    for k, v in pages:
        end = start + k.shape[1]
        for layers, src in ((dst_k, k), (dst_v, v)):
            if src.device != layers[0].device:
                src = src.to(layers[0].device, non_blocking=True)
            for layer, part in zip(layers, src.unbind(0)):
                dsts.append(layer[:, start:end, :])
                srcs.append(part.transpose(0, 1))
        start = end
    foreach = getattr(torch, "_foreach_copy_", None)
    if foreach is not None:
        foreach(dsts, srcs)
    else:  # older torch: the same copies one by one
        for d, s in zip(dsts, srcs):
            d.copy_(s)


def read_page(src_k: Sequence[Any], src_v: Sequence[Any], start: int, end: int,
              dtype: str) -> tuple[Any, Any]:
    """Tokens ``start:end`` of per-layer heads-major tensors ``[kv_heads, seq, head_dim]`` as
    one page ``(k, v)``, each ``[layers, tokens, kv_heads, head_dim]`` of ``dtype`` on the CPU,
    contiguous (ready for the wire)."""
    import torch

    want = torch_dtype(dtype)
    out = []
    for layers in (src_k, src_v):
        first = layers[0]
        page = torch.empty((len(layers), end - start, first.shape[0], first.shape[2]),
                           dtype=want, device=first.device)
        for i, layer in enumerate(layers):
            page[i].copy_(layer[:, start:end, :].transpose(0, 1))
        out.append(page.cpu() if page.device.type != "cpu" else page)
    return out[0], out[1]
