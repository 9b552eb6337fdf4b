"""Codecs: pure functions between pages and self-describing blobs.

API (what the store, transport and eval layers call):

    encode(page, codec, params)  -> bytes      page -> blob (header + payload, checksummed)
    decode(blob, device=None)    -> Decoded    blob -> page in its original dtype; raises
                                               CorruptPage on a bad checksum/header
    transcode(blob, codec, params) -> bytes    re-encode to a lossier codec; int8 -> int4 works
                                               on the integer codes, never via floating point
    read_header(blob)            -> BlobHeader codec, dtype, shape, start position, sizes

See the submodules for the byte layouts.
"""
