"""The Python around the kernels: encode's argument checks, the memoized layouts, the header."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from codec_helpers import make_kv

from kvtier.codecs import BlobHeader, decode, encode, read_header
from kvtier.codecs.blob import HEADER_SIZE
from kvtier.codecs.layout import layout_for_encode, make_layout
from kvtier.config import CodecConfig
from kvtier.errors import InvalidArgument
from kvtier.types import Codec, Page, Precision

P = CodecConfig()


def _error(page: Page) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as e:
        encode(page, Codec.INT8, P)
    return e.value


def test_encode_rejects_bad_pages_with_their_messages() -> None:
    k = torch.zeros(1, 4, 2, 8, dtype=torch.float16)
    cases = [
        (Page(k=k, v=k[:, :2], start_position=0), "k and v must share one 4-D shape and dtype",
         "page"),
        (Page(k=k, v=k.float(), start_position=0), "k and v must share one 4-D shape and dtype",
         "page"),
        (Page(k=k[0], v=k[0], start_position=0), "k and v must share one 4-D shape and dtype",
         "page"),
        (Page(k=k, v=torch.zeros(1, 4, 2, 8, dtype=torch.float16, device="meta"),
              start_position=0), "k and v must be on one device", "page"),
        (Page(k=k[:, :0], v=k[:, :0], start_position=0),
         "page has a zero-size dimension: [1, 0, 2, 8]", "page.shape"),
        (Page(k=k, v=k, start_position=-3), "start_position must be >= 0, got -3",
         "start_position"),
        (Page(k=k, v=k, start_position=1 << 63),
         f"start_position must be >= 0, got {1 << 63}", "start_position"),
    ]
    for page, message, field in cases:
        err = _error(page)
        assert (err.message, err.field) == (message, field)


def test_a_page_that_requires_grad_encodes_like_its_detached_copy() -> None:
    page = make_kv((1, 16, 2, 32), torch.float32, start=2)
    grad = Page(k=page.k.clone().requires_grad_(), v=page.v.clone().requires_grad_(),
                start_position=2)
    for codec in (Codec.INT8, Codec.INT4, Codec.INT4A):
        assert encode(grad, codec, P) == encode(page, codec, P)


@pytest.mark.parametrize("codec", [Codec.NONE, Codec.INT8, Codec.INT4])
def test_memoized_encode_layout_follows_every_parameter_it_depends_on(codec: Codec) -> None:
    shape = (2, 24, 2, 128)
    configs = [P, CodecConfig(group_size=32), CodecConfig(sink_tokens=10),
               CodecConfig(outlier_fraction=0.05), CodecConfig(min_outlier_channels=3),
               CodecConfig(outlier_fraction=0.0, min_outlier_channels=0)]
    seen = set()
    for params in configs:
        for start in (0, 3, 9, 30, 1000):
            lay = layout_for_encode(codec, "float16", shape, start, params)
            # the rule, computed here without the memo
            S = 0 if codec is Codec.NONE else max(0, min(24, params.sink_tokens - start))
            n_out = 0 if codec is Codec.NONE else min(128, max(
                params.min_outlier_channels, int(params.outlier_fraction * 128)))
            assert lay == make_layout(codec, "float16", shape, S, n_out, params.group_size)
            assert (lay.S, lay.n_out, lay.group_size) == (S, n_out, params.group_size)
            page = make_kv(shape, start=start)
            h = read_header(encode(page, codec, params))
            assert (h.sink_tokens, h.outliers, h.payload_nbytes) == (S, n_out,
                                                                       lay.payload_nbytes)
            seen.add((S, n_out, params.group_size))
    if codec is not Codec.NONE:
        assert len(seen) > 8  # the cases above do reach different layouts


def test_layouts_shared_through_the_memo_cannot_be_changed() -> None:
    lay = layout_for_encode(Codec.INT4, "float16", (1, 64, 2, 128), 64, P)
    with pytest.raises(dataclasses.FrozenInstanceError):
        lay.S = 3  # type: ignore[misc]
    assert lay.plan is not None
    for arr in lay.plan:
        assert not arr.flags.writeable
        with pytest.raises(ValueError):
            arr[0] = 1


def test_header_is_an_immutable_value_with_replace() -> None:
    page = make_kv((2, 16, 2, 32), start=1)
    blob = encode(page, Codec.INT4, P)
    h = read_header(blob)
    assert isinstance(h, BlobHeader)
    assert (h.codec, h.dtype, h.shape, h.start_position, h.precision) == (
        Codec.INT4, "float16", (2, 16, 2, 32), 1, Precision.INT4)
    assert h.nbytes == len(blob) == HEADER_SIZE + h.payload_nbytes
    assert (h.group_size, h.sink_tokens, h.outliers, h.key_bits) == (64, 3, 1, 0)
    assert h.page_nbytes == page.nbytes
    with pytest.raises(AttributeError):
        h.codec = Codec.INT8  # type: ignore[misc]
    h2 = h._replace(codec=Codec.INT8)
    assert h2.codec is Codec.INT8 and h.codec is Codec.INT4 and h2.shape == h.shape
    assert read_header(bytearray(blob)) == h == read_header(memoryview(blob))
    assert decode(blob).precision is h.precision
