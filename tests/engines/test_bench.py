"""``kvtier bench ttft`` and ``chat`` end to end on the tiny Llama (the real model is slow)."""

from __future__ import annotations

import argparse
from typing import Any

import pytest
import torch
from tiny_llama import VOCAB, make_tiny_model

from kvtier.lab.bench import chat, ttft


@pytest.fixture()
def tiny(monkeypatch: pytest.MonkeyPatch) -> None:
    """The benches load the tiny model and read a random token stream instead of SmolLM2."""
    model = make_tiny_model()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (4000,), generator=g).tolist()
    for mod in (ttft, chat):
        monkeypatch.setattr(mod, "load", lambda args: (model, None, torch.device("cpu")))
        monkeypatch.setattr(mod, "corpus", lambda tokenizer, path: ids)


def parse(register: Any, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(argv)


def test_ttft_serves_every_tier_and_reports_fidelity(tiny: None) -> None:
    args = parse(ttft.register, ["ttft", "--prefix-tokens", "256", "--suffix-tokens", "16",
                                 "--page-tokens", "64", "--prompts", "2", "--repeats", "1"])
    res = ttft.run(args)
    assert res["prompt_tokens"] == 272 and res["pages_put"] == 2 * 4
    assert list(res["tiers"]) == ["hot", "warm", "cold", "remote"]
    assert res["recompute_s"] > 0 and res["ideal_s"] > 0
    for name, t in res["tiers"].items():
        assert t["served_from"] == {name: 2 * 4}, name  # each tier served its own figures
        assert t["restored_tokens"] == 256
        assert t["ttft_s"] >= t["prefill_s"] > 0
        assert t["speedup"] == pytest.approx(res["recompute_s"] / t["ttft_s"])
        assert t["efficiency"] == pytest.approx(res["ideal_s"] / t["ttft_s"])
    hot, warm, cold = (res["tiers"][n]["kl"] for n in ("hot", "warm", "cold"))
    assert hot < warm < cold  # precision only goes down the tiers
    assert res["tiers"]["remote"]["kl"] == pytest.approx(cold)  # both int4a, same blob


def test_chat_replay_saves_prefill_on_later_turns(tiny: None) -> None:
    args = parse(chat.register, ["chat", "--sessions", "2", "--turns", "3",
                                 "--system-tokens", "128", "--user-tokens", "24",
                                 "--reply-tokens", "8", "--page-tokens", "32"])
    res = chat.run(args)
    assert res["requests"] == 6 and res["failed_puts"] == 0
    plain, cached = res["recompute"], res["kvtier"]
    assert plain["computed_tokens"] == plain["prompt_tokens"]
    assert cached["prompt_tokens"] > 0 and cached["saved_tokens"] > 0
    # every request of a later round finds at least the system prompt (puts run in the
    # background, so the second request of the first round may or may not find it yet)
    assert cached["saved_tokens"] >= 4 * 128
    assert set(cached["served_from"]) == {"hot"}


def test_schedule_interleaves_sessions_round_by_round() -> None:
    order = chat.schedule(3, 2, seed=0)
    assert sorted(order[:3]) == [(0, 0), (1, 0), (2, 0)]
    assert sorted(order[3:]) == [(0, 1), (1, 1), (2, 1)]
    assert order == chat.schedule(3, 2, seed=0)


def test_prompts_share_no_prefix() -> None:
    ps = ttft.prompts(list(range(1000)), 3, 200, 10)
    assert [len(p) for p in ps] == [210] * 3
    assert len({tuple(p[:200]) for p in ps}) == 3
    with pytest.raises(SystemExit, match="text has 100 tokens"):
        ttft.prompts(list(range(100)), 3, 200, 10)
