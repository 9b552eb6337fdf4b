"""Hugging Face transformers on kvtier: restore a prompt's cached prefix, put new pages back.

Generation in a few lines (sync client; :class:`AsyncKVTierConnector` is the same with
``await``)::

    from kvtier_client import KVTierClient
    from kvtier_client.engines.hf import KVTierConnector

    with KVTierClient("127.0.0.1:50051", namespace="chat") as client:
        kv = KVTierConnector(model, client)               # pages of 256 tokens, float16
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = kv.generate(ids, max_new_tokens=64)         # restore -> generate -> save

A hand-written decode loop uses the cache directly::

        cache = kv.restore(ids)                  # the longest cached prefix, ready to extend
        logits = model(ids[:, cache.restored_tokens:], **kv.cache_kwargs(cache)).logits
        ...                                      # decode as usual, passing the same cache

How it works. :meth:`KVTierConnector.restore` asks the daemon (``lookup``) how long a run of
the prompt's page keys it holds, fetches that run (``get``), checks every page against the
model (:class:`~kvtier_client.engines.layout.PageLayout`: layers, tokens, kv heads, head dim,
dtype, position) and writes the pages straight into a :class:`KVTierCache`, a
``DynamicCache`` whose layers (:class:`KVTierLayer`) are views into buffers with room to grow,
so neither the restore nor later decoding concatenates tensors. The model then computes only
the rest of the prompt. Once the first token is out (the next forward pass starts) the cache
puts the prompt's new full pages back from a background thread, so the put never delays the
first token; :meth:`KVTierConnector.save` does the same on demand (for example with the
generated tokens too).

Failure never costs a wrong answer: a daemon that is down, slow (the connector's
``timeout_s``) or answers with pages that do not fit the model means the prompt is recomputed,
with a warning logged and the reason in ``cache.restore_error`` (``strict=True`` raises
instead). A failed put is logged and counted, never raised into generation.

Supported: decoder-only models whose layers all use full attention and share one head dim for
keys and values (Llama, Mistral without sliding window, Qwen2, SmolLM2, ...), batch size 1 per
restore. Needs the ``hf`` extra (torch, transformers).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from kvtier_client.aio import AsyncKVTierClient
from kvtier_client.client import KVTierClient
from kvtier_client.engines.layout import (
    PageLayout,
    model_fingerprint,
    read_page,
    torch_dtype,
    write_pages,
)
from kvtier_client.errors import KVTierClientError
from kvtier_client.tensors import FetchedPage, Page

log = logging.getLogger(__name__)

_MIN_CAPACITY = 256  # tokens a fresh layer buffer holds before it first grows
FETCH_BYTES = 16 << 20  # bytes per get of a restore (see _Core.batches)


class KVTierLayer(DynamicLayer):  # type: ignore[no-untyped-call]  # transformers' hook
    """A ``DynamicLayer`` whose ``keys``/``values`` are views into buffers with spare room.

    ``update`` writes new states into the room left (doubling the buffer when it runs out), so
    a step costs the new tokens, not a copy of the whole sequence as ``torch.cat`` does. Any
    code that replaces ``keys``/``values`` (``crop``, beam reordering, ``reset``) is honoured:
    the next ``update`` adopts what it finds. A one-row cache met by several rows (beam search
    or several samples over one restored prompt) is widened to them.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]
        self._kbuf: torch.Tensor | None = None
        self._vbuf: torch.Tensor | None = None
        self._length = 0

    def adopt(self, kbuf: torch.Tensor, vbuf: torch.Tensor, length: int) -> None:
        """Use ``kbuf``/``vbuf`` (``[batch, heads, capacity, head_dim]``) holding ``length``
        tokens; the cache's restore writes pages there first."""
        self._kbuf, self._vbuf, self._length = kbuf, vbuf, length
        self.keys = kbuf[:, :, :length]
        self.values = vbuf[:, :, :length]
        self.device = kbuf.device
        self.is_initialized = True

    def reset(self) -> None:
        """Drop the contents (transformers before 5.18 zeroed them in place, which a layer
        that appends after its length would then keep as tokens)."""
        self.keys = self.values = None
        self._kbuf = self._vbuf = None
        self._length = 0
        self.is_initialized = False
        if hasattr(self, "cumulative_length"):
            self.cumulative_length = 0

    def _owns_views(self) -> bool:
        """True while ``keys``/``values`` are views ``update`` left; shorter views of the same
        buffers (``crop``) are taken as they are, anything else is adopted by
        :meth:`_readopt`."""
        k, v = self.keys, self.values
        if not (_prefix_of(k, self._kbuf, self._length) and _prefix_of(v, self._vbuf, self._length)
                and k is not None and v is not None and k.shape[-2] == v.shape[-2]):
            return False
        self._length = k.shape[-2]
        return True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        k, rows = self.keys, key_states.shape[0]
        if k is not None and k.dim() == 4 and k.shape[0] == 1 < rows and k.shape[-2]:
            self.batch_repeat_interleave(rows)  # one restored prompt, several beams/samples
        if not self._owns_views():
            self._readopt(key_states)
        n, new = self._length, key_states.shape[-2]
        assert self._kbuf is not None and self._vbuf is not None
        if n + new > self._kbuf.shape[-2]:
            self._grow(n + new)
            assert self._kbuf is not None and self._vbuf is not None
        self._kbuf[:, :, n:n + new].copy_(key_states)
        self._vbuf[:, :, n:n + new].copy_(value_states)
        self._length = n + new
        self.keys = self._kbuf[:, :, :n + new]
        self.values = self._vbuf[:, :, :n + new]
        return self.keys, self.values

    def _readopt(self, like: torch.Tensor) -> None:
        """Take over whatever ``keys``/``values`` hold now (empty after init or reset), with
        room for ``like``'s tokens."""
        k, v = self.keys, self.values
        if k is None or v is None or k.dim() != 4 or k.numel() == 0:
            b, h, _, d = like.shape
            k = like.new_empty((b, h, 0, d))
            v = like.new_empty((b, h, 0, d))
        self._kbuf, self._vbuf, self._length = k, v, k.shape[-2]
        self._grow(self._length + like.shape[-2])

    def _grow(self, need: int) -> None:
        assert self._kbuf is not None and self._vbuf is not None
        cap = max(_MIN_CAPACITY, need, 2 * self._kbuf.shape[-2])
        bufs = []
        for old in (self._kbuf, self._vbuf):
            b, h, _, d = old.shape
            buf = old.new_empty((b, h, cap, d))
            buf[:, :, :self._length].copy_(old[:, :, :self._length])
            bufs.append(buf)
        self._kbuf, self._vbuf = bufs


def _prefix_of(view: torch.Tensor | None, buf: torch.Tensor | None, length: int) -> bool:
    """``view`` is the first tokens (at most ``length``) of ``buf``."""
    return (view is not None and buf is not None and view.dim() == 4
            and view.data_ptr() == buf.data_ptr() and view.shape[:2] == buf.shape[:2]
            and view.stride() == buf.stride() and view.shape[-2] <= length)


@dataclass(slots=True)
class RestoreInfo:
    """What a restore did: tokens reused, where the pages came from, where the time went."""

    prompt_tokens: int = 0
    restored_tokens: int = 0
    tiers: tuple[str, ...] = ()  # tier that served each restored page
    precisions: tuple[int, ...] = ()  # lowest precision each page went through (16, 8, 4)
    lookup_s: float = 0.0
    get_s: float = 0.0
    build_s: float = 0.0
    error: str | None = None  # why the prefix was recomputed instead (None: no failure)


class KVTierCache(DynamicCache):
    """A ``DynamicCache`` for one prompt, made by :meth:`KVTierConnector.restore`.

    It holds the prompt's restored prefix (``restored_tokens``; ``restore`` tells how) and
    grows like any dynamic cache. ``token_ids`` is the prompt it was restored for: once the
    model has run over the whole prompt, the next forward pass (the first token is out) starts
    the put of the prompt's new full pages through ``on_prompt_done``.
    """

    def __init__(self, num_layers: int, token_ids: Sequence[int]) -> None:
        # DynamicCache.__init__ picks its own layer classes; the layers are given here instead,
        # which is the extension point transformers' Cache offers.
        Cache.__init__(self, layers=[KVTierLayer() for _ in range(num_layers)])
        self.token_ids: list[int] = list(token_ids)
        self.restore = RestoreInfo(prompt_tokens=len(self.token_ids))
        self.on_prompt_done: Callable[[KVTierCache], None] | None = None
        self._prompt_done = False
        self.saved_tokens = 0  # tokens whose full pages were restored or handed to a put

    @property
    def restored_tokens(self) -> int:
        return self.restore.restored_tokens

    @property
    def restore_error(self) -> str | None:
        return self.restore.error

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx == 0 and self._prompt_done and self.on_prompt_done is not None:
            hook, self.on_prompt_done = self.on_prompt_done, None
            hook(self)
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if (not self._prompt_done and layer_idx == len(self.layers) - 1
                and self.get_seq_length() >= len(self.token_ids)):
            self._prompt_done = True
        return out

    def layer_views(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each layer's keys and values of batch row 0, ``[kv_heads, seq, head_dim]``."""
        ks, vs = [], []
        for layer in self.layers:
            k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
            if k is None or v is None:
                raise ValueError("the cache has layers the model never ran")
            ks.append(k[0])
            vs.append(v[0])
        return ks, vs


def _text_config(model: Any) -> Any:
    config = model.config
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if get is not None else config


def layout_of(model: Any, page_tokens: int, dtype: str | None = None,
              model_id: str | None = None,
              accept: tuple[str, ...] | None = None) -> PageLayout:
    """The page layout of ``model``; ValueError naming why a model is not supported."""
    cfg = _text_config(model)
    if getattr(cfg, "is_encoder_decoder", False):
        raise ValueError("encoder-decoder models are not supported")
    types = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    sliding = (getattr(cfg, "sliding_window", None) is not None
               and getattr(cfg, "use_sliding_window", True) is not False)
    if sliding and not getattr(cfg, "layer_types", None):
        types.add("sliding_attention")
    if types != {"full_attention"}:
        raise ValueError("only models whose layers all use full attention are supported "
                         f"(this one has {', '.join(sorted(types))})")
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    if dtype is None:
        mdtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        dtype = mdtype if mdtype in ("float16", "bfloat16") else "float16"
    kw: dict[str, Any] = {} if accept is None else {"accept": accept}
    return PageLayout(layers=cfg.num_hidden_layers, kv_heads=kv_heads, head_dim=head_dim,
                      page_tokens=page_tokens, dtype=dtype,
                      model_id=model_id or fingerprint(model), **kw)


def fingerprint(model: Any) -> str:
    """:func:`~kvtier_client.engines.layout.model_fingerprint` of a transformers model."""
    cfg = _text_config(model)
    fields = ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "hidden_size", "vocab_size", "rope_theta", "rope_scaling",
              "rope_parameters", "max_position_embeddings", "rms_norm_eps")
    config = {f: getattr(cfg, f, None) for f in fields}
    samples = []
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda item: item[0]):
            if p.device.type == "meta":  # offloaded without data here: not part of the id
                continue
            head = p.detach().reshape(-1)[:16].to("cpu", torch.bfloat16)
            samples.append(head.view(torch.int16).numpy().tobytes())
    return model_fingerprint(config, samples)


def cache_kwarg(model: Any) -> str:
    """The name a model's forward takes its cache by (``cache`` in newer transformers,
    ``past_key_values`` before)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@dataclass(slots=True)
class SaveStats:
    """Puts the connector made: pages stored, pages the daemon already had, failures."""

    stored: int = 0
    existed: int = 0
    failed: int = 0
    last_error: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, outcomes: Sequence[str]) -> None:
        with self._lock:
            self.stored += sum(o == "stored" for o in outcomes)
            self.existed += sum(o != "stored" for o in outcomes)

    def fail(self, n: int, error: BaseException) -> None:
        with self._lock:
            self.failed += n
            self.last_error = str(error)


class _Core:
    """What both connectors share, with no I/O: keys, page checks, cache building, cutting
    a cache into pages. The drivers only add the client calls and the threads."""

    def __init__(self, model: Any, namespace: str, page_tokens: int, page_dtype: str | None,
                 model_id: str | None, accept: tuple[str, ...] | None, strict: bool) -> None:
        self.model = model
        self.namespace = namespace
        self.layout = layout_of(model, page_tokens, page_dtype, model_id, accept)
        self.strict = strict
        self.kwarg = cache_kwarg(model)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype

    def token_list(self, input_ids: Any) -> list[int]:
        ids = input_ids
        if isinstance(ids, torch.Tensor):
            if ids.dim() == 2:
                if ids.shape[0] != 1:
                    raise ValueError(f"restore takes one prompt (batch size 1), got {ids.shape[0]}")
                ids = ids[0]
            return [int(t) for t in ids.tolist()]
        return [int(t) for t in ids]

    def begin(self, input_ids: Any, hook: Callable[[KVTierCache], None] | None
              ) -> tuple[KVTierCache, list[bytes]]:
        """An empty cache for the prompt and the keys of its pages that may be restored."""
        tokens = self.token_list(input_ids)
        cache = KVTierCache(self.layout.layers, tokens)
        cache.on_prompt_done = hook
        n = self.layout.reusable_pages(len(tokens))
        keys = self.layout.keys(tokens[:n * self.layout.page_tokens], self.namespace) if n else []
        return cache, keys

    def batches(self, keys: Sequence[bytes]) -> list[list[bytes]]:
        """``keys`` cut into the gets of a restore: about ``FETCH_BYTES`` each, so the cache
        build of one batch overlaps the transfer (and the daemon's decode) of the next."""
        lay = self.layout
        page_bytes = 2 * math.prod(lay.page_shape) * torch_dtype(lay.dtype).itemsize
        n = max(1, FETCH_BYTES // page_bytes)
        return [list(keys[i:i + n]) for i in range(0, len(keys), n)]

    def start(self, cache: KVTierCache, found: int, capacity: int) -> Build:
        return Build(self, cache, found, capacity)

    def failed(self, cache: KVTierCache, error: BaseException) -> KVTierCache:
        """An empty cache for the prompt after ``error`` (raised instead when strict)."""
        if self.strict:
            raise error
        fresh = KVTierCache(len(cache.layers), cache.token_ids)
        fresh.on_prompt_done = cache.on_prompt_done
        fresh.restore.error = f"{type(error).__name__}: {error}"
        log.warning("kvtier: recomputing the prompt (%s)", fresh.restore.error)
        return fresh

    def plan_save(self, cache: KVTierCache, token_ids: Sequence[int] | None
                  ) -> SavePlan | None:
        """The full pages ``cache`` holds beyond those restored or saved already, as a plan
        whose bytes are cut out later (off the model's thread); None when there are none.
        ``token_ids`` (default: the prompt) must be the tokens the cache holds, in order.

        The plan keeps views of the cache's current buffers. Their first tokens are never
        written again: later steps append past them, and a buffer that grows is copied, so
        the views stay valid while the model goes on decoding.
        """
        tokens = list(cache.token_ids if token_ids is None else token_ids)
        held = min(len(tokens), cache.get_seq_length())
        lay = self.layout
        first, last = cache.saved_tokens // lay.page_tokens, lay.full_pages(held)
        if last <= first:
            return None
        keys = lay.keys(tokens[:last * lay.page_tokens], self.namespace)
        ks, vs = cache.layer_views()
        cache.saved_tokens = last * lay.page_tokens
        return SavePlan(keys[first:last], range(first, last), lay, ks, vs)


class Build:
    """One restore being written into a cache: buffers with room for the pages found, filled
    batch by batch as the gets arrive, committed to the cache's layers at the end."""

    def __init__(self, core: _Core, cache: KVTierCache, found: int, capacity: int) -> None:
        lay = core.layout
        self._core, self._cache = core, cache
        self._busy = 0.0  # seconds spent writing pages
        cap = max(capacity, found * lay.page_tokens + 1)
        # One buffer per layer and tensor: buffers this size come from memory the process
        # already touched, where one tensor for all layers would be fresh pages every time.
        shape = (1, lay.kv_heads, cap, lay.head_dim)
        dev, dtype = core.device, core.dtype
        self._kbufs = [torch.empty(shape, dtype=dtype, device=dev) for _ in cache.layers]
        self._vbufs = [torch.empty(shape, dtype=dtype, device=dev) for _ in cache.layers]
        self._pages: list[FetchedPage] = []
        self.ended = False  # a miss ended the run

    def add(self, pages: Sequence[FetchedPage | None]) -> bool:
        """Check the next pages of the run and write them; False once the run has ended (a
        page gone between lookup and get ends it there). LayoutMismatch on a page that does
        not fit the model."""
        t0 = time.perf_counter()
        lay = self._core.layout
        run: list[FetchedPage] = []
        for page in pages:
            if page is None:
                self.ended = True
                break
            lay.check(len(self._pages) + len(run), page.shape, page.dtype, page.start_position)
            run.append(page)
        write_pages([b[0] for b in self._kbufs], [b[0] for b in self._vbufs],
                    [(p.k, p.v) for p in run], first_token=len(self._pages) * lay.page_tokens)
        self._pages += run
        self._busy += time.perf_counter() - t0
        return not self.ended

    def commit(self, lookup_s: float, elapsed_s: float) -> KVTierCache:
        """The cache holding the run written so far, with the restore's figures: of the
        ``elapsed_s`` since the lookup, ``build_s`` is the time spent writing pages and
        ``get_s`` the rest (waiting for gets)."""
        cache, pages = self._cache, self._pages
        tokens = len(pages) * self._core.layout.page_tokens
        if pages:
            for layer, kbuf, vbuf in zip(cache.layers, self._kbufs, self._vbufs):
                assert isinstance(layer, KVTierLayer)
                layer.adopt(kbuf, vbuf, tokens)
        info = cache.restore
        info.restored_tokens = tokens
        info.tiers = tuple(p.tier for p in pages)
        info.precisions = tuple(p.precision for p in pages)
        info.lookup_s, info.build_s = lookup_s, self._busy
        info.get_s = max(0.0, elapsed_s - self._busy)
        cache.saved_tokens = tokens  # restored pages need no put
        return cache


@dataclass(frozen=True, slots=True)
class SavePlan:
    """Pages to put: their keys and where they lie in a cache (see :meth:`_Core.plan_save`)."""

    keys: list[bytes]
    indices: range
    layout: PageLayout
    ks: list[torch.Tensor]
    vs: list[torch.Tensor]

    def pages(self) -> list[Page]:
        """Copy the pages out of the cache, in the page dtype, on the CPU."""
        t = self.layout.page_tokens
        out = []
        for i in self.indices:
            k, v = read_page(self.ks, self.vs, i * t, (i + 1) * t, self.layout.dtype)
            out.append(Page(k, v, start_position=i * t, chain_position=i))
        return out


class KVTierConnector:
    """Restores prompts from kvtier into a transformers model and puts new pages back.

    ``client``: a :class:`~kvtier_client.KVTierClient` (shared memory or TCP, as it chose).
    ``page_tokens``: tokens per page (all workers sharing pages must agree). ``page_dtype``:
    dtype pages are put in (default: the model's when float16/bfloat16, else float16).
    ``accept``: dtypes a fetched page may have (default: any of float16, bfloat16, float32).
    ``model_id``: the key salt (default: a fingerprint of the model's config and weights).
    ``timeout_s``: deadline of a restore's calls; past it the prompt is recomputed.
    ``strict``: raise instead of recomputing when a restore fails.
    """

    def __init__(self, model: Any, client: KVTierClient, *, page_tokens: int = 256,
                 page_dtype: str | None = None, namespace: str | None = None,
                 model_id: str | None = None, accept: tuple[str, ...] | None = None,
                 timeout_s: float = 5.0, strict: bool = False) -> None:
        self.client = client
        self.timeout_s = timeout_s
        self._core = _Core(model, namespace or client.namespace, page_tokens, page_dtype,
                           model_id, accept, strict)
        self.saves = SaveStats()
        self.last_restore: RestoreInfo | None = None  # of the last generate()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kvtier-put")
        # gets of a restore run here, one after another, while the caller builds the cache
        self._fetcher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kvtier-get")
        self._pending: list[concurrent.futures.Future[int]] = []

    @property
    def layout(self) -> PageLayout:
        return self._core.layout

    def cache_kwargs(self, cache: KVTierCache) -> dict[str, Any]:
        """``{name: cache}`` for the model's forward (the argument's name depends on the
        transformers version)."""
        return {self._core.kwarg: cache}

    def restore(self, input_ids: Any, *, capacity: int | None = None,
                save: bool = True) -> KVTierCache:
        """A cache holding the longest run of the prompt's pages the daemon has.

        ``capacity``: tokens to make room for (default: the prompt plus 256), so generation
        does not grow the buffers. ``save``: put the prompt's new full pages once the first
        token is out (see :class:`KVTierCache`).
        """
        core = self._core
        cache, keys = core.begin(input_ids, self._save_hook if save else None)
        if not keys:
            return cache
        try:
            t0 = time.perf_counter()
            found = self.client.lookup(keys, namespace=core.namespace,
                                       timeout_s=self.timeout_s).prefix_length
            t1 = time.perf_counter()
            if not found:
                return cache
            gets = [self._fetcher.submit(self.client.get, batch, namespace=core.namespace,
                                         timeout_s=self.timeout_s, as_torch=True)
                    for batch in core.batches(keys[:found])]
            build = core.start(cache, found, capacity or len(cache.token_ids) + 256)
            try:
                for get in gets:
                    if not build.add(get.result()):
                        break
            finally:
                for get in gets:
                    get.cancel()
            return build.commit(t1 - t0, time.perf_counter() - t1)
        except (KVTierClientError, ValueError) as e:
            return core.failed(cache, e)

    def _save_hook(self, cache: KVTierCache) -> None:
        self.save(cache)

    def save(self, cache: KVTierCache, token_ids: Sequence[int] | None = None, *,
             wait: bool = False) -> concurrent.futures.Future[int]:
        """Put the full pages ``cache`` holds that kvtier does not have from it yet.

        The pages are cut out of the cache now (a copy in the page dtype; the cache may go on
        growing) and put from a background thread. ``token_ids``: the tokens the cache holds
        when it holds more than the prompt (prompt + generated). The future gives the number
        of pages put; ``wait`` blocks until it is done. Failures are logged and counted in
        ``saves``, never raised.
        """
        try:
            plan = self._core.plan_save(cache, token_ids)
        except ValueError as e:
            log.warning("kvtier: nothing saved (%s)", e)
            self.saves.fail(0, e)
            plan = None
        if plan is None:
            done: concurrent.futures.Future[int] = concurrent.futures.Future()
            done.set_result(0)
            return done
        future = self._pool.submit(self._put, plan)
        self._pending = [f for f in self._pending if not f.done()] + [future]
        if wait:
            future.result()
        return future

    def _put(self, plan: SavePlan) -> int:
        try:
            outcomes = self.client.put(plan.keys, plan.pages(), namespace=self._core.namespace)
        except (KVTierClientError, ValueError, RuntimeError) as e:
            log.warning("kvtier: put of %d pages failed: %s", len(plan.keys), e)
            self.saves.fail(len(plan.keys), e)
            return 0
        self.saves.count(outcomes)
        return len(plan.keys)

    def generate(self, input_ids: Any, *, save_generated: bool = False,
                 **generate_kwargs: Any) -> Any:
        """``model.generate`` over a restored cache; the prompt's new pages are put once the
        first token is out (with ``save_generated``, the generated tokens' full pages too).
        Returns what ``generate`` returns."""
        model = self._core.model
        new = int(generate_kwargs.get("max_new_tokens") or 256)
        tokens = self._core.token_list(input_ids)
        cache = self.restore(input_ids, capacity=len(tokens) + new + 1)
        self.last_restore = cache.restore
        out = model.generate(input_ids, **{self._core.kwarg: cache}, **generate_kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        self.save(cache, sequences[0].tolist() if save_generated else None)
        return out

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait for the puts started so far."""
        concurrent.futures.wait(self._pending, timeout=timeout_s)
        self._pending = [f for f in self._pending if not f.done()]

    def close(self) -> None:
        """Finish pending puts and stop the connector's threads (the client stays open)."""
        self._pool.shutdown(wait=True)
        self._fetcher.shutdown(wait=True)

    def __enter__(self) -> KVTierConnector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncKVTierConnector:
    """:class:`KVTierConnector` for asyncio code, over an
    :class:`~kvtier_client.AsyncKVTierClient`. Create it inside the running loop.

    ``restore`` and ``save`` are awaited; the model itself runs where the caller runs it
    (``await asyncio.to_thread(model.generate, ...)`` keeps the loop free, which is what
    :meth:`generate` does). Puts started by the cache's first-token hook are scheduled on the
    loop from whatever thread runs the model.
    """

    def __init__(self, model: Any, client: AsyncKVTierClient, *, page_tokens: int = 256,
                 page_dtype: str | None = None, namespace: str | None = None,
                 model_id: str | None = None, accept: tuple[str, ...] | None = None,
                 timeout_s: float = 5.0, strict: bool = False) -> None:
        self.client = client
        self.timeout_s = timeout_s
        self._core = _Core(model, namespace or client.namespace, page_tokens, page_dtype,
                           model_id, accept, strict)
        self.saves = SaveStats()
        self.last_restore: RestoreInfo | None = None  # of the last generate()
        self._loop = asyncio.get_running_loop()
        self._pending: set[asyncio.Task[int]] = set()

    @property
    def layout(self) -> PageLayout:
        return self._core.layout

    def cache_kwargs(self, cache: KVTierCache) -> dict[str, Any]:
        return {self._core.kwarg: cache}

    async def restore(self, input_ids: Any, *, capacity: int | None = None,
                      save: bool = True) -> KVTierCache:
        """As :meth:`KVTierConnector.restore`."""
        core = self._core
        cache, keys = core.begin(input_ids, self._save_hook if save else None)
        if not keys:
            return cache
        try:
            t0 = time.perf_counter()
            found = (await self.client.lookup(keys, namespace=core.namespace,
                                              timeout_s=self.timeout_s)).prefix_length
            t1 = time.perf_counter()
            if not found:
                return cache
            gets = [asyncio.ensure_future(self.client.get(
                batch, namespace=core.namespace, timeout_s=self.timeout_s, as_torch=True))
                for batch in core.batches(keys[:found])]
            build = core.start(cache, found, capacity or len(cache.token_ids) + 256)
            try:
                for get in gets:
                    if not await asyncio.to_thread(build.add, await get):
                        break
            finally:
                for get in gets:
                    get.cancel()
            return build.commit(t1 - t0, time.perf_counter() - t1)
        except (KVTierClientError, ValueError) as e:
            return core.failed(cache, e)

    def _save_hook(self, cache: KVTierCache) -> None:
        plan = self._plan(cache, None)  # in the model's thread, before the cache moves on
        if plan is None:
            return
        try:
            self._loop.call_soon_threadsafe(self._start, plan)
        except RuntimeError as e:  # the loop is closed: never an error inside the model
            log.warning("kvtier: put of %d pages not started: %s", len(plan.keys), e)
            self.saves.fail(len(plan.keys), e)

    def _plan(self, cache: KVTierCache, token_ids: Sequence[int] | None) -> SavePlan | None:
        try:
            return self._core.plan_save(cache, token_ids)
        except ValueError as e:
            log.warning("kvtier: nothing saved (%s)", e)
            self.saves.fail(0, e)
            return None

    def _start(self, plan: SavePlan) -> asyncio.Task[int]:
        task = self._loop.create_task(self._put(plan))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return task

    async def save(self, cache: KVTierCache, token_ids: Sequence[int] | None = None, *,
                   wait: bool = False) -> int:
        """As :meth:`KVTierConnector.save`: the put runs as a task; ``wait`` awaits it.
        Returns the pages put (0 when not waiting)."""
        plan = self._plan(cache, token_ids)
        if plan is None:
            return 0
        task = self._start(plan)
        return await task if wait else 0

    async def _put(self, plan: SavePlan) -> int:
        try:
            pages = await asyncio.to_thread(plan.pages)
            outcomes = await self.client.put(plan.keys, pages, namespace=self._core.namespace)
        except (KVTierClientError, ValueError, RuntimeError) as e:
            log.warning("kvtier: put of %d pages failed: %s", len(plan.keys), e)
            self.saves.fail(len(plan.keys), e)
            return 0
        self.saves.count(outcomes)
        return len(plan.keys)

    async def generate(self, input_ids: Any, *, save_generated: bool = False,
                       **generate_kwargs: Any) -> Any:
        """As :meth:`KVTierConnector.generate`, the model running in a worker thread."""
        model = self._core.model
        new = int(generate_kwargs.get("max_new_tokens") or 256)
        tokens = self._core.token_list(input_ids)
        cache = await self.restore(input_ids, capacity=len(tokens) + new + 1)
        self.last_restore = cache.restore
        out = await asyncio.to_thread(model.generate, input_ids,
                                      **{self._core.kwarg: cache}, **generate_kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        await self.save(cache, sequences[0].tolist() if save_generated else None)
        return out

    async def flush(self) -> None:
        """Wait for the puts started so far."""
        if self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)


__all__ = ["AsyncKVTierConnector", "KVTierCache", "KVTierConnector", "KVTierLayer",
           "RestoreInfo", "SaveStats", "cache_kwarg", "fingerprint", "layout_of"]
