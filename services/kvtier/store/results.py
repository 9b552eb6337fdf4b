"""What the store's data-path calls answer: frozen value objects, no tensors shared mutably."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from kvtier.types import Page, PageId, Precision


class PutOutcome(str, enum.Enum):
    """Per-key answer of ``put``: stored now, or already present (puts are idempotent)."""

    STORED = "stored"
    EXISTS = "exists"


@dataclass(frozen=True, slots=True)
class GetResult:
    """A page as its tier holds it, decoded to the page's dtype, on the host.

    ``precision`` is the lowest precision the page has passed through; a page promoted back to
    the hot tier after a stay in int4 still reports INT4.
    """

    page: Page
    tier: str
    precision: Precision


@dataclass(frozen=True, slots=True)
class RawResult:
    """A page as raw little-endian bytes, for transports that send bytes.

    For hot-tier pages in host memory, ``k`` and ``v`` are read-only views of the stored tensors
    (no copy); the store never writes into a stored tensor, so the views stay valid and
    unchanged even after the page moves or is deleted. Other pages are decoded into fresh buffers.
    """

    dtype: str
    shape: tuple[int, int, int, int]
    start_position: int
    k: memoryview
    v: memoryview
    tier: str
    precision: Precision


@dataclass(frozen=True, slots=True)
class LookupResult:
    """``tiers[i]`` holds ``keys[i]`` (None = absent); ``prefix_length`` = leading present run."""

    prefix_length: int
    tiers: list[str | None]


@dataclass(frozen=True, slots=True)
class PageInfo:
    """Metadata of one page plus the current policy's score for it (higher = keep)."""

    page: PageId
    tier: str
    state: str
    precision: Precision
    nbytes: int
    stored_bytes: int
    last_access_time: float
    access_count: int
    chain_position: int
    score: float
