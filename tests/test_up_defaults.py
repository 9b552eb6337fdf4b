"""``kvtier up`` runs the learned policy embedded unless the operator chose a policy."""

from __future__ import annotations

import pytest

from kvtier.cli.up import embedded_defaults
from kvtier.config import load_settings
from kvtier.transport.policy.client import make_policy


def test_up_embeds_the_learned_policy_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVTIER_POLICY__NAME", raising=False)
    settings = embedded_defaults(load_settings())
    assert settings.policy.name == "learned"
    assert settings.policy.address is None  # embedded, not a remote service
    status = make_policy(settings.policy).status()
    assert status.name == "learned" and status.fallback_active and status.active == "lru"


def test_up_keeps_a_configured_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVTIER_POLICY__NAME", "lru")
    assert embedded_defaults(load_settings()).policy.name == "lru"
    monkeypatch.delenv("KVTIER_POLICY__NAME")
    assert embedded_defaults(load_settings(policy={"name": "arc"})).policy.name == "arc"
