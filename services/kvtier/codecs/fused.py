"""Fused CPU kernels (numba). Placeholder until the kernels land: everything runs in torch."""

from __future__ import annotations

import torch

from kvtier.codecs.layout import Layout
from kvtier.types import Page


def available() -> bool:
    return False


def encode_into(page: Page, lay: Layout, buf: bytearray) -> None:
    raise NotImplementedError


def decode(blob: memoryview, lay: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    raise NotImplementedError


def int8_rows_to_int4(src: memoryview, width: int, dst: memoryview) -> None:
    raise NotImplementedError


def warmup() -> None:
    """Compile (or load from cache) every kernel now, not in the first real request."""
