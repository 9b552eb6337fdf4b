"""Policy value objects <-> ``kvtier.v1`` policy messages. Validation names the bad field."""

from __future__ import annotations

from kvtier.errors import InvalidArgument
from kvtier.store.policy import AccessEvent, AccessKind, PageMeta
from kvtier.types import Namespace, PageId, PageKey
from kvtier_proto.v1 import policy_pb2


def _page(namespace: str, key: bytes) -> PageId:
    if not namespace:
        raise InvalidArgument("must not be empty", field="namespace")
    if not key:
        raise InvalidArgument("must not be empty", field="key")
    return PageId(Namespace(namespace), PageKey(bytes(key)))


def access_to_msg(ev: AccessEvent) -> policy_pb2.PolicyAccess:
    msg = policy_pb2.PolicyAccess(
        namespace=ev.page.namespace, key=ev.page.key, seq=ev.seq, time=ev.time,
        kind=ev.kind.value, tier_hit=ev.tier_hit or "", nbytes=ev.nbytes,
        chain_position=ev.chain_position,
    )
    if ev.attention_mass is not None:
        msg.attention_mass = ev.attention_mass
    return msg


def access_from_msg(msg: policy_pb2.PolicyAccess) -> AccessEvent:
    try:
        kind = AccessKind(msg.kind)
    except ValueError:
        raise InvalidArgument(
            f"unknown access kind {msg.kind!r}; known: {', '.join(k.value for k in AccessKind)}",
            field="kind") from None
    return AccessEvent(
        page=_page(msg.namespace, msg.key), seq=msg.seq, time=msg.time, kind=kind,
        tier_hit=msg.tier_hit or None, nbytes=msg.nbytes, chain_position=msg.chain_position,
        attention_mass=msg.attention_mass if msg.HasField("attention_mass") else None,
    )


def meta_to_msg(m: PageMeta) -> policy_pb2.PolicyPage:
    return policy_pb2.PolicyPage(
        namespace=m.page.namespace, key=m.page.key, tier=m.tier, tier_index=m.tier_index,
        nbytes=m.nbytes, created_seq=m.created_seq, last_seq=m.last_seq, last_time=m.last_time,
        access_count=m.access_count, chain_position=m.chain_position,
    )


def meta_from_msg(msg: policy_pb2.PolicyPage) -> PageMeta:
    return PageMeta(
        page=_page(msg.namespace, msg.key), tier=msg.tier, tier_index=msg.tier_index,
        nbytes=msg.nbytes, created_seq=msg.created_seq, last_seq=msg.last_seq,
        last_time=msg.last_time, access_count=msg.access_count,
        chain_position=msg.chain_position,
    )
