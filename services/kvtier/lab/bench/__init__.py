"""Benchmarks that print figures (ratios against a baseline measured in the same run)."""

from __future__ import annotations

import sys
from typing import Any


def progress(total: int, label: str, unit: str = "step") -> Any:
    """A progress bar on stderr, drawn only on a terminal (``--json`` output stays clean)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit=unit, leave=False, file=sys.stderr, disable=None)
