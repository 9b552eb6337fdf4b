"""Build the configured policy by name. The daemon and replay get their policies here."""

from __future__ import annotations

from collections.abc import Callable

from kvtier.config import PolicyConfig
from kvtier.errors import InvalidArgument
from kvtier.store.policy import LFUPolicy, LRUPolicy, Policy

_FACTORIES: dict[str, Callable[[PolicyConfig], Policy]] = {
    "lru": lambda _cfg: LRUPolicy(),
    "lfu": lambda _cfg: LFUPolicy(),
}


def policy_names() -> list[str]:
    return sorted(_FACTORIES)


def make_policy(config: PolicyConfig) -> Policy:
    """The live policy for ``config.name``; InvalidArgument naming the known ones otherwise."""
    try:
        factory = _FACTORIES[config.name]
    except KeyError:
        raise InvalidArgument(
            f"unknown policy {config.name!r}; known: {', '.join(policy_names())}", field="policy"
        ) from None
    return factory(config)
