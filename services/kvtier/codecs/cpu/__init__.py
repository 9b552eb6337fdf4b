"""The codecs' CPU backend: numba kernels that produce the bytes of the torch reference
(:mod:`kvtier.codecs.torch_reference`) bit for bit, a layer at a time.

    backend.py     blob sections as numpy views handed to the kernels
    int8_int4.py   encode and decode kernels of the int8 and int4 codecs
    int4a.py       int4a's key bit allocation and code maps
    rows.py        row helpers: float conversions, the grid, code packing
    intrinsics.py  LLVM intrinsics numba lacks (bit casts, lrint, prefetch, min/max)

The kernels are compiled once per machine and kept in numba's on-disk cache
(``__pycache__/*.nbi``, ``*.nbc`` here). numba checks a cached kernel against its own file only,
but these kernels inline helpers from the other files: a change to ``rows.py`` alone would leave
every caller's stale machine code in use. So the cache is keyed on all of this package's sources
at once: importing the package drops the cached kernels when any of them changed
(:func:`_drop_stale_kernels`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_STAMP = "kernel-sources.sha256"


def _drop_stale_kernels() -> None:
    """Delete numba's cached kernels of this package unless they were compiled from the sources
    as they are now. A cache directory that cannot be written (a read-only install, where
    numba keeps its cache elsewhere and the sources never change) is left alone."""
    digest = hashlib.sha256()
    for path in sorted(_HERE.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    want = digest.hexdigest()
    cache = _HERE / "__pycache__"
    stamp = cache / _STAMP
    try:
        if stamp.read_text() == want:
            return
    except OSError:
        pass
    try:
        cache.mkdir(exist_ok=True)
        for stale in cache.glob("*.nb[ic]"):
            stale.unlink(missing_ok=True)
        stamp.write_text(want)
    except OSError:
        pass


_drop_stale_kernels()
