"""Tier descriptions, the in-memory byte holder, and turning a page into a tier's stored form.

A tier stores a page in one of three forms:

- a :class:`~kvtier.types.Page` (tensors) in a memory tier whose codec is ``none``; on the
  ``device`` medium that is the CUDA device when there is one, else the CPU — the same code;
- a :class:`Promoted` page in such a tier: the tensors decoded from a quantized blob, *plus
  that blob*. Demoting it again reuses the blob instead of quantizing the decoded values a
  second time, so a page that goes up and down never drifts further from what was put;
- a codec blob (bytes, see :mod:`kvtier.codecs`) everywhere else, Redis included.

A blob tier keeps a blob that is already at or below its codec's precision as it is (a page
promoted from int4 into an int8 tier stays int4: bits lost are lost), and re-encodes anything
more precise: pages with :func:`~kvtier.codecs.encode`, int8 blobs with
:func:`~kvtier.codecs.transcode` on the integer codes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvtier.codecs import decode, encode, read_header, transcode
from kvtier.config import CodecConfig, TierConfig
from kvtier.errors import ConfigError, CorruptPage, InvalidArgument, NonFinitePage
from kvtier.pages import check_page_finite
from kvtier.store.stats import CodecClock
from kvtier.types import Codec, Medium, Page, PageId, Precision


@dataclass(frozen=True, slots=True)
class Promoted:
    """Tensors decoded from ``blob`` (a quantized page promoted into a tensor tier)."""

    page: Page
    blob: bytes


Stored = Page | Promoted | bytes
"""A page as a tier holds it (see the module docstring)."""


def resolve_device(setting: str) -> torch.device:
    """The hot tier's device: ``auto`` = CUDA when available, else CPU."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(setting)
    except RuntimeError:
        raise ConfigError(f"device {setting!r} is not a torch device", field="device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {setting!r} asked for but CUDA is not available",
                          field="device")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {setting!r}: use auto, cpu, cuda or cuda:N", field="device")
    return dev


@dataclass(frozen=True, slots=True)
class TierSpec:
    """What a tier is (fixed for the store's life). ``device`` only for tensor tiers."""

    name: str
    index: int
    medium: Medium
    codec: Codec
    device: torch.device | None

    @property
    def holds_tensors(self) -> bool:
        return self.device is not None


@dataclass(frozen=True, slots=True)
class TierLimits:
    """A tier's byte capacity (hard limit) and the watermarks the mover works between."""

    capacity_bytes: int
    high_watermark: float
    low_watermark: float

    @classmethod
    def of(cls, cfg: TierConfig) -> TierLimits:
        return cls(cfg.capacity_bytes, cfg.high_watermark, cfg.low_watermark)

    def replace(
        self, capacity_bytes: int | None, high_watermark: float | None,
        low_watermark: float | None,
    ) -> TierLimits:
        """New limits, validated: capacity > 0 and 0 <= low < high <= 1."""
        cap = self.capacity_bytes if capacity_bytes is None else capacity_bytes
        high = self.high_watermark if high_watermark is None else high_watermark
        low = self.low_watermark if low_watermark is None else low_watermark
        if cap <= 0:
            raise InvalidArgument(f"capacity_bytes must be > 0, got {cap}",
                                  field="capacity_bytes")
        if not 0.0 < high <= 1.0:
            raise InvalidArgument(f"high_watermark must be in (0, 1], got {high}",
                                  field="high_watermark")
        if not 0.0 <= low < high:
            raise InvalidArgument(
                f"low_watermark must be in [0, high_watermark={high}), got {low}",
                field="low_watermark")
        return TierLimits(cap, high, low)

    @property
    def high_bytes(self) -> int:
        return int(self.capacity_bytes * self.high_watermark)

    @property
    def low_bytes(self) -> int:
        return int(self.capacity_bytes * self.low_watermark)


def build_specs(tiers: list[TierConfig], device: torch.device) -> list[TierSpec]:
    specs = []
    for i, cfg in enumerate(tiers):
        dev: torch.device | None = None
        if cfg.codec is Codec.NONE and cfg.medium is not Medium.REDIS:
            dev = device if cfg.medium is Medium.DEVICE else torch.device("cpu")
        specs.append(TierSpec(cfg.name, i, cfg.medium, cfg.codec, dev))
    return specs


class MemoryBackend:
    """The bytes of one in-memory tier: PageId -> stored form.

    Not locked by itself: the store only touches it under its index lock, and every operation
    is a dict operation (the encode/decode work happens outside the lock). Stored tensors and
    blobs are never mutated, so a reader holding a reference sees a whole page even after it
    moves away.
    """

    def __init__(self, spec: TierSpec) -> None:
        self.spec = spec
        self._data: dict[PageId, Stored] = {}

    def get(self, page: PageId) -> Stored | None:
        return self._data.get(page)

    def put(self, page: PageId, data: Stored) -> None:
        self._data[page] = data

    def pop(self, page: PageId) -> Stored | None:
        return self._data.pop(page, None)

    def copy(self) -> dict[PageId, Stored]:
        return dict(self._data)

    def __len__(self) -> int:
        return len(self._data)


def stored_size(data: Stored) -> int:
    """Bytes a stored form occupies in its tier (a promoted page counts its blob too)."""
    if isinstance(data, Page):
        return data.nbytes
    if isinstance(data, Promoted):
        return data.page.nbytes + len(data.blob)
    return len(data)


class Converter:
    """Turns stored forms into the form a target tier keeps, timing codec work per op/codec."""

    def __init__(self, params: CodecConfig, clock: CodecClock) -> None:
        self.params = params
        self.clock = clock
        # moves that touch the device pool (kvtier.store.device_transfer): None to pass
        self.device_moves: Callable[[Stored, TierSpec], tuple[Stored, Precision] | None] | \
            None = None

    def to_tier(self, data: Stored, spec: TierSpec) -> tuple[Stored, Precision]:
        """``data`` in ``spec``'s stored form, and the precision that form has."""
        if self.device_moves is not None and (moved := self.device_moves(data, spec)):
            return moved
        if spec.device is not None:
            if isinstance(data, Page):
                return to_device(data, spec.device), Precision.FULL
            if isinstance(data, Promoted):
                return Promoted(to_device(data.page, spec.device), data.blob), \
                    Precision.of_codec(read_header(data.blob).codec)
            page, prec = self.decode(data, spec.device)
            return (page if prec is Precision.FULL else Promoted(page, data)), prec
        if isinstance(data, Page):
            if data.k.device.type == "cpu":  # a lent page (kvtier.transport.shm.lend) is its
                _check_finite_again(data)  # client's memory; the codecs need finite values
            t0 = time.perf_counter()
            blob = encode(data, spec.codec, self.params)
            self.clock.add("encode", spec.codec.value, time.perf_counter() - t0)
            return blob, Precision.of_codec(spec.codec)
        if isinstance(data, Promoted):
            data = data.blob
        have = read_header(data).codec
        if have.bits <= spec.codec.bits:
            return data, Precision.of_codec(have)
        t0 = time.perf_counter()
        blob = transcode(data, spec.codec, self.params)
        self.clock.add("transcode", spec.codec.value, time.perf_counter() - t0)
        return blob, Precision.of_codec(spec.codec)

    def decode(self, blob: bytes, device: torch.device | None) -> tuple[Page, Precision]:
        """Decode a blob (checksum verified; CorruptPage otherwise) onto ``device``."""
        t0 = time.perf_counter()
        dec = decode(blob, device)
        self.clock.add("decode", dec.codec.value, time.perf_counter() - t0)
        return dec.page, Precision.of_codec(dec.codec)

    def to_host(self, data: Stored) -> Page:
        """A private host copy of a stored page, decoded if it is a blob."""
        if isinstance(data, Promoted):
            data = data.page
        if isinstance(data, Page):
            return Page(k=data.k.to("cpu", copy=True), v=data.v.to("cpu", copy=True),
                        start_position=data.start_position)
        return self.decode(data, None)[0]


def own_copy(page: Page, device: torch.device) -> Page:
    """A private contiguous copy of ``page`` on ``device`` (a put must not alias the caller)."""
    return Page(
        k=page.k.detach().to(device=device, copy=True, memory_format=torch.contiguous_format),
        v=page.v.detach().to(device=device, copy=True, memory_format=torch.contiguous_format),
        start_position=page.start_position,
    )


def _check_finite_again(page: Page) -> None:
    """NonFinitePage unless ``page`` is finite (about 30 us per 2 MiB on the host)."""
    try:
        check_page_finite(page)
    except InvalidArgument as e:
        raise NonFinitePage(f"a page changed after its put: {e}", field="page") from None


def adoptable(page: Page, device: torch.device) -> bool:
    """True if ``page`` can be kept as it is in a tier on ``device`` (no copy needed)."""
    return all(t.device == device and t.is_contiguous() for t in (page.k, page.v))


def to_device(page: Page, device: torch.device) -> Page:
    """``page`` on ``device``, contiguous; shares storage when it already is (never mutated)."""
    k = page.k.to(device).contiguous()
    v = page.v.to(device).contiguous()
    if k is page.k and v is page.v:
        return page
    return Page(k=k, v=v, start_position=page.start_position)


def blob_of(data: Stored) -> bytes:
    """Narrow a stored form to a blob; a tensor here is a programming error (always checked)."""
    if not isinstance(data, bytes):
        raise CorruptPage("a tensor page reached a blob-only tier", field="page")
    return data
