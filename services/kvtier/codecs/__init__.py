"""Codecs: pure functions between pages and self-describing blobs.

API (what the store, transport and eval layers call)::

    encode(page, codec, params)  -> bytes      page -> blob (header + payload, checksummed)
    decode(blob, device=None)    -> Decoded    blob -> page in its original dtype; raises
                                               CorruptPage on a bad checksum/header
    transcode(blob, codec, params) -> bytes    re-encode to a lossier codec; int8 -> int4 works
                                               on the integer codes, never via floating point
    read_header(blob)            -> BlobHeader codec, dtype, shape, start position, sizes
    warmup()                                   compile and self-test the CPU kernels now (call
                                               at start)

Submodules: the format (``blob``: header and checksum; ``layout``: payload sections; ``grid``:
scales and minima; ``pack``: int4 and 12-bit packing), one module per codec that needs its own
(``int4a``), the backends (``torch_reference``: pure torch, any device, the oracle; ``cpu``:
the numba kernels), and ``codec`` (the API).
"""

from kvtier.codecs.blob import BlobHeader, read_header
from kvtier.codecs.codec import Decoded, decode, encode, transcode, warmup


__all__ = ["BlobHeader", "Decoded", "decode", "encode", "read_header", "transcode", "warmup"]
