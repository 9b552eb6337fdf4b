"""``kvtier bench chat``: a multi-turn chat replay through a real model, with and without kvtier.

``--sessions`` conversations share one system prompt (``--system-tokens`` of real text) and
take ``--turns`` turns each, interleaved the way a serving worker sees them (every round, each
live session sends its next turn, in a shuffled order). A turn's prompt is the conversation so
far (system prompt, earlier user turns and the model's greedy replies) plus a new user turn of
``--user-tokens`` tokens from elsewhere in the text; the model replies with ``--reply-tokens``
tokens.

The replay runs twice over the same sessions: once recomputing every prompt, once through
:class:`kvtier_client.engines.hf.KVTierConnector` (restore the longest cached prefix, prefill
the rest, put the new pages, the reply's included, in the background). Each run keeps its own
history, as a serving system would. It reports time to first token (p50, p99, mean; from the
request's start to the first generated token, measured by a streamer inside ``generate``), the
prompt tokens computed and saved, which tier served the restored pages, and how many replies
came out the same in both runs. The daemon's memory tiers can be made small
(``--hot-mib``, ...) to see lower tiers serve.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from kvtier.lab.bench.ttft import add_model_arguments, corpus, endpoint, load, progress

NAMESPACE = "bench-chat"


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "chat", help="multi-turn chat replay through SmolLM2 with and without kvtier")
    add_model_arguments(p)
    p.add_argument("--sessions", type=int, default=4, help="conversations, interleaved")
    p.add_argument("--turns", type=int, default=4, help="turns per conversation")
    p.add_argument("--system-tokens", type=int, default=1024, help="shared system prompt")
    p.add_argument("--user-tokens", type=int, default=64, help="tokens of each user turn")
    p.add_argument("--reply-tokens", type=int, default=16, help="tokens of each reply")
    p.add_argument("--seed", type=int, default=0, help="order of turns and their texts")
    for tier in ("hot", "warm", "cold", "remote"):
        p.add_argument(f"--{tier}-mib", type=int, default=None,
                       help=f"capacity of the started daemon's {tier} tier (default: its own)")
    p.set_defaults(func=main)


class FirstToken:
    """A ``generate`` streamer that notes when the first generated token arrives."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.first: float | None = None
        self._calls = 0

    def put(self, value: Any) -> None:
        self._calls += 1
        if self._calls == 2 and self.first is None:  # call 1 is the prompt itself
            self.first = time.perf_counter() - self.start

    def end(self) -> None:
        pass


@dataclass(slots=True)
class Run:
    ttft: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    computed_tokens: int = 0
    served: dict[str, int] = field(default_factory=dict)
    replies: list[list[int]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        xs = sorted(self.ttft)
        p99 = xs[min(len(xs) - 1, round(0.99 * (len(xs) - 1)))]
        return {"ttft_p50_s": statistics.median(xs), "ttft_p99_s": p99,
                "ttft_mean_s": statistics.fmean(xs), "prompt_tokens": self.prompt_tokens,
                "computed_tokens": self.computed_tokens,
                "saved_tokens": self.prompt_tokens - self.computed_tokens,
                "served_from": self.served}


def schedule(sessions: int, turns: int, seed: int) -> list[tuple[int, int]]:
    """(session, turn) in arrival order: round by round, each round shuffled."""
    rng = random.Random(seed)
    order = []
    for turn in range(turns):
        live = list(range(sessions))
        rng.shuffle(live)
        order += [(s, turn) for s in live]
    return order


def user_turns(ids: list[int], args: argparse.Namespace) -> dict[tuple[int, int], list[int]]:
    """A slice of the text after the system prompt for every (session, turn)."""
    rng = random.Random(args.seed + 1)
    lo, hi = args.system_tokens, len(ids) - args.user_tokens
    if hi <= lo:
        raise SystemExit("kvtier bench: the text is too short for these prompts")
    out = {}
    for s in range(args.sessions):
        for t in range(args.turns):
            at = rng.randrange(lo, hi)
            out[(s, t)] = ids[at:at + args.user_tokens]
    return out


def replay(model: Any, order: list[tuple[int, int]], system: list[int],
           turns: dict[tuple[int, int], list[int]], reply_tokens: int, device: torch.device,
           kv: Any | None, bar: Any) -> Run:
    run = Run()
    history = {s: list(system) for s, _ in order}
    for s, t in order:
        prompt = history[s] + turns[(s, t)]
        ids = torch.tensor([prompt], device=device)
        start = time.perf_counter()
        streamer = FirstToken(start)
        gen: dict[str, Any] = {"max_new_tokens": reply_tokens, "do_sample": False,
                               "streamer": streamer}
        restored = 0
        cache = None
        if kv is not None:
            cache = kv.restore(ids, capacity=len(prompt) + reply_tokens + 1)
            restored = cache.restored_tokens
            for tier in cache.restore.tiers:
                run.served[tier] = run.served.get(tier, 0) + 1
            gen.update(kv.cache_kwargs(cache))
        out = model.generate(ids, **gen)
        if kv is not None:
            kv.save(cache, out[0].tolist())
        reply = out[0, len(prompt):].tolist()
        assert streamer.first is not None
        run.ttft.append(streamer.first)
        run.prompt_tokens += len(prompt)
        run.computed_tokens += len(prompt) - restored
        run.replies.append(reply)
        history[s] = prompt + reply
        bar.update()
    if kv is not None:
        kv.flush()
    return run


def run(args: argparse.Namespace) -> dict[str, Any]:
    from kvtier_client import KVTierClient
    from kvtier_client.engines.hf import KVTierConnector

    model, tokenizer, device = load(args)
    ids = corpus(tokenizer, args.text)
    system = ids[:args.system_tokens]
    turns = user_turns(ids, args)
    order = schedule(args.sessions, args.turns, args.seed)
    env = {}
    for tier, default_codec, medium in (("hot", "none", "device"), ("warm", "int8", "host"),
                                        ("cold", "int4a", "host"), ("remote", "int4a", "redis")):
        mib = getattr(args, f"{tier}_mib")
        env[tier] = {"name": tier, "medium": medium, "codec": default_codec,
                     "capacity_bytes": (mib if mib is not None else
                                        {"hot": 1024, "warm": 2048, "cold": 4096,
                                         "remote": 16384}[tier]) << 20}
    settings = {"KVTIER_TIERS": json.dumps(list(env.values()))}
    bar = progress(2 * len(order), "chat")
    with torch.inference_mode():
        model.generate(torch.tensor([system[:32]], device=device), max_new_tokens=2,
                       do_sample=False)  # warm-up
        plain = replay(model, order, system, turns, args.reply_tokens, device, None, bar)
        with endpoint(args, settings) as ep, KVTierClient(
                ep.grpc, NAMESPACE, timeout_s=60,
                shared_memory=args.transport == "shm") as client:
            kv = KVTierConnector(model, client, page_tokens=args.page_tokens,
                                 page_dtype=args.page_dtype)
            cached = replay(model, order, system, turns, args.reply_tokens, device, kv, bar)
            failed = kv.saves.failed
    bar.close()
    same = sum(a == b for a, b in zip(plain.replies, cached.replies))
    return {
        "model": "SmolLM2-135M-Instruct", "device": str(device),
        "threads": torch.get_num_threads(), "sessions": args.sessions, "turns": args.turns,
        "requests": len(order), "system_tokens": args.system_tokens,
        "user_tokens": args.user_tokens, "reply_tokens": args.reply_tokens,
        "page_tokens": args.page_tokens, "transport": args.transport,
        "recompute": plain.summary(), "kvtier": cached.summary(),
        "ttft_p50_speedup": plain.summary()["ttft_p50_s"] / cached.summary()["ttft_p50_s"],
        "same_replies": same, "failed_puts": failed,
    }


def print_table(res: dict[str, Any]) -> None:
    print(f"SmolLM2-135M on {res['device']} ({res['threads']} threads): {res['sessions']} "
          f"sessions x {res['turns']} turns ({res['requests']} requests), system prompt "
          f"{res['system_tokens']}, turns of {res['user_tokens']}, replies of "
          f"{res['reply_tokens']}, pages of {res['page_tokens']}, {res['transport']}")
    print(f"{'':<10}{'TTFT p50':>10}{'p99':>9}{'mean':>9}{'prompt tok':>12}{'computed':>10}"
          f"{'saved':>8}")
    for name in ("recompute", "kvtier"):
        r = res[name]
        print(f"{name:<10}{r['ttft_p50_s'] * 1e3:8.0f}ms{r['ttft_p99_s'] * 1e3:7.0f}ms"
              f"{r['ttft_mean_s'] * 1e3:7.0f}ms{r['prompt_tokens']:12d}{r['computed_tokens']:10d}"
              f"{r['saved_tokens'] / r['prompt_tokens']:8.0%}")
    served = ", ".join(f"{k} {v}" for k, v in res["kvtier"]["served_from"].items()) or "none"
    print(f"p50 speedup {res['ttft_p50_speedup']:.1f}x; restored pages by tier: {served}; "
          f"replies identical in both runs: {res['same_replies']} of {res['requests']}")


def main(args: argparse.Namespace) -> int:
    res = run(args)
    if args.json:
        print(json.dumps(res))
    else:
        print_table(res)
    return 0
