"""SmolLM2-135M served from every tier: the first-token fidelity targets (slow: the real model).

Run with ``.venv/bin/python -m pytest -q -m slow tests/engines/test_smollm2_ttft.py`` (a few
minutes on the CPU). Timing targets are benchmark figures (``kvtier bench ttft``), not asserted.
"""

from __future__ import annotations

import argparse

import pytest

from kvtier.lab.bench import ttft

pytestmark = pytest.mark.slow


def test_first_token_fidelity_on_every_tier() -> None:
    parser = argparse.ArgumentParser()
    ttft.register(parser.add_subparsers())
    res = ttft.run(parser.parse_args(["ttft", "--prompts", "4", "--repeats", "1"]))
    tiers = res["tiers"]
    assert set(tiers) == {"hot", "warm", "cold", "remote"}
    for name in ("hot", "warm"):
        assert tiers[name]["kl"] <= 1e-4, name
    for name in ("cold", "remote"):
        assert tiers[name]["kl"] <= 2e-3, name
    assert tiers["cold"]["top1_agree"] >= 0.95
    for name, t in tiers.items():
        assert t["served_from"] == {name: 4 * 8} and t["restored_tokens"] == 2048
