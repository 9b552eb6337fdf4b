"""Page transforms: what the evaluation does to a page of KV cache before it is used again.

A transform takes a page (already in the storage dtype) and returns the page as a reader would
get it back, plus the bytes the stored form occupies with all metadata counted. The tier
stack's codecs are one kind (encode, then decode the blob: the bytes are the blob's length); the
evaluation's prototype quantizer and research codecs are others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from kvtier.config import CodecConfig
from kvtier.lab.eval.quant import QuantSpec, quantize_page
from kvtier.types import Codec, Page


@dataclass(frozen=True, slots=True)
class Roundtrip:
    """A page as read back after storage, and the bytes it was stored in."""

    page: Page
    nbytes: int


class PageTransform(Protocol):
    """Anything that can store and read back a page. Implementations are immutable."""

    @property
    def name(self) -> str: ...

    def roundtrip(self, page: Page) -> Roundtrip: ...


@dataclass(frozen=True, slots=True)
class Identity:
    """Stored as put (the hot tier): the page's raw bytes, read back exactly."""

    name: str = "none"

    def roundtrip(self, page: Page) -> Roundtrip:
        return Roundtrip(page=page, nbytes=page.nbytes)


@dataclass(frozen=True, slots=True)
class CodecTransform:
    """The tier stack's real codec: ``kvtier.codecs.encode`` then ``decode`` the blob."""

    codec: Codec
    params: CodecConfig
    name: str

    def roundtrip(self, page: Page) -> Roundtrip:
        from kvtier import codecs

        blob = codecs.encode(page, self.codec, self.params)
        dec = codecs.decode(blob, device=page.k.device)
        return Roundtrip(page=dec.page, nbytes=len(blob))


@dataclass(frozen=True, slots=True)
class QuantTransform:
    """The evaluation's prototype quantizer (:mod:`kvtier.lab.eval.quant`) with one setting."""

    spec: QuantSpec
    name: str

    def roundtrip(self, page: Page) -> Roundtrip:
        q = quantize_page(page.k, page.v, page.start_position, self.spec)
        return Roundtrip(page=Page(k=q.k, v=q.v, start_position=page.start_position),
                         nbytes=q.nbytes)


def codecs_available() -> bool:
    """Whether :mod:`kvtier.codecs` exposes the encode/decode API yet."""
    try:
        from kvtier import codecs
    except ImportError:
        return False
    return hasattr(codecs, "encode") and hasattr(codecs, "decode")
