"""Build a live policy by name, in this process. The daemon, the policy service and replay get
their policies here.

Names: ``lru``, ``lfu`` (the store's fallbacks), ``arc``, ``s3fifo`` (queue-structured
classic cores), ``learned`` (the temporal importance predictor). A daemon configured with
``PolicyConfig.address`` asks a ``kvtier policy`` service instead
(:func:`kvtier.transport.policy.client.make_policy`). Belady's MIN needs the future and is
deliberately not here: it exists only in replay reports.
"""

from __future__ import annotations

from collections.abc import Callable

from kvtier.config import PolicyConfig
from kvtier.errors import InvalidArgument
from kvtier.policy.adapter import ARCPolicy, S3FIFOPolicy
from kvtier.policy.learned.policy import LearnedPolicy
from kvtier.store.policy import LFUPolicy, LRUPolicy, Policy

_FACTORIES: dict[str, Callable[[PolicyConfig], Policy]] = {
    "lru": lambda _cfg: LRUPolicy(),
    "lfu": lambda _cfg: LFUPolicy(),
    "arc": lambda _cfg: ARCPolicy(),
    "s3fifo": lambda _cfg: S3FIFOPolicy(),
    "learned": lambda _cfg: LearnedPolicy(),
}


def policy_names() -> list[str]:
    return sorted(_FACTORIES)


def make_local_policy(config: PolicyConfig) -> Policy:
    """The named policy in this process, ignoring ``config.address``."""
    try:
        factory = _FACTORIES[config.name]
    except KeyError:
        raise InvalidArgument(
            f"unknown policy {config.name!r}; known: {', '.join(policy_names())}", field="policy"
        ) from None
    return factory(config)

