"""Passkey plumbing and the whole evaluation (the `--json` object) on the tiny model."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kvtier.errors import InvalidArgument
from kvtier.lab.eval.passkey import build_trial, run_passkey
from kvtier.lab.eval.suite import Options, evaluate
from kvtier.lab.eval.transforms import Identity, PageTransform, QuantTransform
from kvtier.lab.eval.quant import QuantSpec

from .conftest import CharTokenizer


def test_trial_context_is_exact_and_holds_the_needle() -> None:
    tok = CharTokenizer()
    ctx, question, answer = build_trial(tok, 12345, 0.2, 1024)
    assert len(ctx) == 1024
    needle = tok.encode("The pass key is 12345.")
    at = next(i for i in range(len(ctx)) if ctx[i:i + len(needle)] == needle)
    assert 0.1 * 1024 < at < 0.4 * 1024
    assert answer == tok.encode(" 12345")
    with pytest.raises(InvalidArgument) as e:
        build_trial(tok, 12345, 0.2, 64)
    assert e.value.field == "passkey_tokens"


def test_passkey_is_the_same_for_equal_transforms(tiny_model: Any) -> None:
    tok = CharTokenizer()
    transforms: dict[str, PageTransform] = {"none": Identity(), "also-none": Identity(name="also"),
                  "int2": QuantTransform(QuantSpec(bits=2, k_group=16, v_group=16), "int2")}
    res = run_passkey(tiny_model, tok, transforms, trials=3, context_tokens=512,
                      page_tokens=128, progress=False)
    assert res.trials == 3
    assert set(res.accuracy) == set(transforms)
    assert res.accuracy["none"] == res.accuracy["also-none"]
    assert all(0.0 <= a <= 1.0 for a in res.accuracy.values())
    with pytest.raises(InvalidArgument) as e:
        run_passkey(tiny_model, tok, transforms, trials=1, context_tokens=100, page_tokens=64)
    assert e.value.field == "passkey_tokens"


def test_evaluate_gives_the_json_keys(tiny_model: Any, tiny_ids: torch.Tensor) -> None:
    from kvtier.config import CodecConfig
    from kvtier.lab.eval.catalog import Catalog

    opts = Options(codecs=("none", "int8", "int4", "mixed"), page_tokens=64, passkey_trials=2,
                   passkey_tokens=512, passkey_codecs=("int4",), batch=2, progress=False)
    ev = evaluate(tiny_model, CharTokenizer(), tiny_ids, opts,
                  catalog=Catalog(params=CodecConfig(group_size=16)))
    out = ev.json()
    for key in ("kl", "top1", "ppl", "delta_pct", "bits_per_element", "cosine_min"):
        assert set(out[key]) == {"none", "int8", "int4", "mixed"}, key
    assert out["kl"]["none"] == 0.0 and out["top1"]["none"] == 1.0
    assert out["kl"]["int8"] < out["kl"]["mixed"] < out["kl"]["int4"]
    assert 16.0 <= out["bits_per_element"]["none"] < 16.2  # raw bytes + the blob header
    assert set(out["passkey_acc"]) == {"none", "int4"}
    assert out["passkey_trials"] == 2
    assert "| int4 |" in ev.markdown()


def test_cli_rejects_a_bad_codec_before_loading_the_model(
        capsys: pytest.CaptureFixture[str]) -> None:
    from kvtier.cli import main

    assert main(["eval", "quality", "--codecs", "int4", "int2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "codecs" in err and "int2" in err
