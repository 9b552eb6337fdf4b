"""Any flipped byte, truncation or garbage raises CorruptPage; nothing decodes into garbage."""

from __future__ import annotations

import pytest
from codec_helpers import make_kv

from kvtier.codecs import decode, encode, read_header, transcode
from kvtier.config import CodecConfig
from kvtier.errors import CorruptPage
from kvtier.types import Codec

P = CodecConfig()


@pytest.mark.parametrize("codec", list(Codec))
def test_every_flipped_byte_is_caught(codec: Codec) -> None:
    page = make_kv((1, 9, 2, 8), start=2)  # sinks and outliers present: every section used
    blob = encode(page, codec, P)
    for i in range(len(blob)):
        for mask in (0x01, 0x80):
            bad = bytearray(blob)
            bad[i] ^= mask
            with pytest.raises(CorruptPage):
                decode(bytes(bad))
            with pytest.raises(CorruptPage):
                transcode(bytes(bad), Codec.INT4, P)


def test_flips_in_a_large_blob_are_caught() -> None:
    blob = encode(make_kv((2, 64, 2, 64)), Codec.INT8, P)
    for i in range(0, len(blob), 997):
        bad = bytearray(blob)
        bad[i] ^= 0x10
        with pytest.raises(CorruptPage):
            decode(memoryview(bad))


@pytest.mark.parametrize("blob", [b"", b"KVTC", b"\x00" * 64, b"x" * 1000])
def test_garbage_is_corrupt(blob: bytes) -> None:
    with pytest.raises(CorruptPage):
        decode(blob)
    with pytest.raises(CorruptPage):
        read_header(blob)


def test_truncated_or_extended_is_corrupt() -> None:
    blob = encode(make_kv((1, 8, 1, 16)), Codec.INT4, P)
    for bad in (blob[:-1], blob[:64], blob + b"\x00"):
        with pytest.raises(CorruptPage) as e:
            decode(bad)
        assert e.value.field is not None and e.value.field.startswith("blob")


def _reseal(blob: bytearray) -> bytes:
    """Recompute the checksum, as a forger with write access to Redis could."""
    import struct

    from kvtier.codecs.blob import HEADER_SIZE, checksum

    struct.pack_into("<Q", blob, HEADER_SIZE - 8,
                     checksum(bytes(blob[:HEADER_SIZE - 8]), bytes(blob[HEADER_SIZE:])))
    return bytes(blob)


@pytest.mark.parametrize("section,value", [("oidx", 999), ("oidx", -1), ("exps", 3000)])
@pytest.mark.parametrize("kernels", [True, False])
def test_forged_blob_with_valid_checksum_is_rejected(section: str, value: int, kernels: bool,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import struct

    from kvtier.codecs import codec
    from kvtier.codecs.layout import layout_of

    blob = encode(make_kv((2, 16, 2, 32), start=9), Codec.INT8, P)
    off, _ = layout_of(read_header(blob)).section(section)
    bad = bytearray(blob)
    struct.pack_into("<h", bad, off, value)
    if not kernels:
        monkeypatch.setattr(codec, "_kernels_run_on", lambda device: False)  # the CUDA path
    with pytest.raises(CorruptPage):
        decode(_reseal(bad))
