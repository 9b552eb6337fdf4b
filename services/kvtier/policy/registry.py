"""Build the configured live policy by name. The daemon and replay get their policies here.

Names: ``lru``, ``lfu`` (the store's fallbacks), ``arc``, ``s3fifo`` (queue-structured
classic cores), ``learned`` (the temporal importance predictor). With ``PolicyConfig.address`` set
the named policy runs in a ``kvtier policy`` service and the daemon gets a
:class:`~kvtier.policy.remote.RemotePolicy` client of it. Belady's MIN needs the future and is
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


def make_policy(config: PolicyConfig) -> Policy:
    """The live policy for ``config``: embedded, or a client of the service at its address.

    InvalidArgument naming the known policies for an unknown name.
    """
    if config.name not in _FACTORIES:
        make_local_policy(config)  # raises with the list of names
    if config.address:
        from kvtier.policy.remote import RemotePolicy  # grpc only when a service is used

        return RemotePolicy(config.address, configured=config.name,
                            timeout_s=config.timeout_s, queue_size=config.queue_size)
    return make_local_policy(config)
