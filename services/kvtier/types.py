"""Value objects shared by every layer: page identity, tiers, precision, pages.

Everything here is a frozen, slotted dataclass or an enum so it can cross module boundaries
without anyone mutating it behind the owner's back.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, NewType

if TYPE_CHECKING:
    import torch

PageKey = NewType("PageKey", bytes)
"""Opaque key chosen by the client, normally a chained prefix hash."""

Namespace = NewType("Namespace", str)
"""A tenant. No namespace can see another's keys."""

NAMESPACE_MAX = 128
NAMESPACE_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")


def namespace_problem(namespace: object) -> str | None:
    """Why ``namespace`` is not a valid namespace, or None if it is.

    A namespace is 1..128 characters of ASCII letters, digits, ``-``, ``_`` and ``.``, does not
    start with ``.`` and holds no ``..``. Only ASCII: a full-width or accented letter would make
    names that look equal and are not, and the same names appear in paths, metrics and tokens.
    """
    if not isinstance(namespace, str):
        return f"namespace must be a string, got {type(namespace).__name__}"
    if not namespace or len(namespace) > NAMESPACE_MAX:
        return f"namespace must be 1..{NAMESPACE_MAX} characters, got {len(namespace)}"
    if not NAMESPACE_ALPHABET.issuperset(namespace):
        return (f"namespace {namespace[:NAMESPACE_MAX]!r} may only hold ASCII letters, digits, "
                "'-', '_' and '.'")
    if namespace.startswith(".") or ".." in namespace:
        return f"namespace {namespace!r} must not start with '.' or hold '..'"
    return None

TierName = NewType("TierName", str)


class PageId(NamedTuple):
    """A page's identity: its namespace and its key.

    A named tuple rather than a frozen dataclass: page ids key every dict of the index and the
    policies, and a tuple's hash runs in C (about 4x faster per lookup than a dataclass's
    generated ``__hash__``, measured on 64-candidate policy decisions).
    """

    namespace: Namespace
    key: PageKey

    def __str__(self) -> str:
        return f"{self.namespace}/{self.key.hex()}"


class Codec(str, enum.Enum):
    """How a tier stores a page's bytes."""

    NONE = "none"
    INT8 = "int8"
    INT4 = "int4"
    INT4A = "int4a"  # 4 bits on average, key bits allocated per channel (kvtier.codecs.int4a)
    INT3 = "int3"  # about 3 bits: key and value bits allocated per page (kvtier.codecs.int3)

    @property
    def bits(self) -> int:
        """Bits per quantized element (on average); 16 stands for 'as put' (full precision)."""
        return {Codec.NONE: 16, Codec.INT8: 8, Codec.INT4: 4, Codec.INT4A: 4, Codec.INT3: 3}[self]


class Precision(enum.IntEnum):
    """The lowest precision a page has passed through. Ordered: lower is lossier.

    Precision only goes down: a page demoted through int4 and promoted back to the hot tier
    still reports INT4, because promotion decodes but cannot restore lost bits.
    """

    INT3 = 3
    INT4 = 4
    INT8 = 8
    FULL = 16

    @classmethod
    def of_codec(cls, codec: Codec) -> Precision:
        return {Codec.NONE: cls.FULL, Codec.INT8: cls.INT8, Codec.INT4: cls.INT4,
                Codec.INT4A: cls.INT4, Codec.INT3: cls.INT3}[codec]


class Medium(str, enum.Enum):
    """Where a tier keeps its bytes."""

    DEVICE = "device"  # accelerator memory; CPU memory when there is no CUDA device
    HOST = "host"
    REDIS = "redis"


@dataclass(frozen=True, slots=True)
class DType:
    """A dtype a page may have: the one table every layer reads (wire name, sizes, codes).

    ``code`` is its number in a blob header (:mod:`kvtier.codecs.blob`; a stored byte, never
    renumbered) and in the CPU kernels' arguments. ``numpy`` names the numpy dtype that holds
    its values, None for bfloat16 (numpy has none). ``exponent`` masks its exponent bits in one
    element: all ones is NaN or Inf. The torch dtype has the same name
    (:func:`kvtier.pages.torch_dtype`).
    """

    name: str
    itemsize: int
    code: int
    numpy: str | None
    exponent: int


DTYPES: dict[str, DType] = {d.name: d for d in (
    DType("float16", 2, 0, "<f2", 0x7C00),
    DType("bfloat16", 2, 1, None, 0x7F80),
    DType("float32", 4, 2, "<f4", 0x7F80_0000),
)}
SUPPORTED_DTYPES = tuple(DTYPES)


@dataclass(frozen=True, slots=True)
class Page:
    """The KV cache of one chunk of tokens of one sequence.

    ``k`` and ``v`` are shaped ``[layers, tokens, kv_heads, head_dim]`` with identical shape and
    dtype (float16, bfloat16 or float32). ``start_position`` is the index of the chunk's first
    token in its sequence; it decides which tokens are attention sinks. Build pages through
    :func:`kvtier.pages.make_page`, which validates them.
    """

    k: torch.Tensor
    v: torch.Tensor
    start_position: int

    @property
    def nbytes(self) -> int:
        return int(self.k.numel() * self.k.element_size() * 2)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        s = tuple(self.k.shape)
        return (s[0], s[1], s[2], s[3])


class Outcome(str, enum.Enum):
    """Per-key outcome of a batch operation, used by stats and metrics labels."""

    HIT = "hit"
    MISS = "miss"
    STORED = "stored"
    EXISTS = "exists"
    REJECTED = "rejected"


class EvictionReason(str, enum.Enum):
    """Why a page left the last tier (bounded label values for metrics)."""

    CAPACITY = "capacity"  # overflow of the last tier
    REMOTE_DOWN = "remote_down"  # Redis down while cold passed its hard limit
    NOT_ADMITTED = "not_admitted"  # the policy declined to keep it anywhere
    CORRUPT = "corrupt"  # checksum failed on read; the page is dropped, never served
    DELETED = "deleted"  # explicit delete by a client or operator
    ORPHAN = "orphan"  # its predecessor in the chain left the cache: no prefix can reach it
