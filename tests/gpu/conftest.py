"""GPU tests: every module here marks its tests ``gpu`` and they skip without a
CUDA device. They need no Redis (the lent GPU machine has no redis-server).
``tests/gpu/device-check.sh`` runs them."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "codecs"))  # codec_helpers
