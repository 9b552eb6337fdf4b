"""Every bad input gets INVALID_ARGUMENT naming the field; the daemon keeps serving."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from kvtier.config import TierConfig
from kvtier.daemon import Daemon
from kvtier.types import Codec, Medium
from kvtier_client import (
    InternalError,
    InvalidArgumentError,
    KVTierClient,
    KVTierClientError,
    Page,
    RawTensor,
    ResourceExhaustedError,
)

from .conftest import PAGE_SHAPE, DaemonFactory, make_kv, make_page

K, V = make_kv(0)

BAD: dict[str, tuple[Callable[[KVTierClient], Any], str, str]] = {
    # name: (call, field named in the message, words of the message)
    "kv_shape_mismatch": (lambda c: c.put([b"x"], [Page(K, V[:, :8])]), "v.shape",
                          "shapes differ"),
    "kv_dtype_mismatch": (lambda c: c.put([b"x"], [Page(K, V.astype(np.float32))]), "v.dtype",
                          "dtypes differ"),
    "dtype_unsupported": (lambda c: c.put([b"x"], [Page(K.astype(np.float64),
                                                         V.astype(np.float64))]),
                          "dtype", "not supported"),
    "dtype_int8": (lambda c: c.put([b"x"], [Page(K.astype(np.int8), V.astype(np.int8))]),
                   "dtype", "not supported"),
    "byte_length": (lambda c: c.put([b"x"], [Page(RawTensor(K.tobytes()[:-2], "float16",
                                                            PAGE_SHAPE), V)]),
                    "k.data", "needs"),
    "shape_not_4d": (lambda c: c.put([b"x"], [Page(K.reshape(4, 16, 64), V.reshape(4, 16, 64))]),
                     "shape", "4 positive sizes"),
    "empty_keys_get": (lambda c: c.get([]), "keys", "empty"),
    "empty_keys_lookup": (lambda c: c.lookup([]), "keys", "empty"),
    "empty_keys_delete": (lambda c: c.delete([]), "keys", "empty"),
    "empty_keys_promote": (lambda c: c.promote([], "hot"), "keys", "empty"),
    "empty_pages_put": (lambda c: c.put([], []), "pages", "empty"),
    "empty_key": (lambda c: c.get([b""]), "key", "empty"),
    "key_too_long_get": (lambda c: c.get([b"k" * 1025]), "key", "1025 bytes"),
    "key_too_long_put": (lambda c: c.put([b"k" * 1025], [make_page(1)]), "key", "1025 bytes"),
    "page_too_large": (lambda c: c.put([b"x"], [make_page(1, shape=(4, 64, 8, 128))]), "page",
                       "maximum page size"),
    "unknown_tier": (lambda c: c.promote([b"x"], "lukewarm"), "tier", "unknown tier"),
    "negative_start_position": (lambda c: c.put([b"x"], [Page(K, V, -1)]), "start_position",
                                ">= 0"),
    "nan_values": (lambda c: c.put([b"x"], [Page(np.full(PAGE_SHAPE, np.nan, np.float16), V)]),
                   "k", "NaN"),
    "bad_namespace": (lambda c: c.get([b"x"], namespace="no/slashes"), "namespace",
                      "may only hold"),
    "duplicate_keys": (lambda c: c.put([b"d", b"d"], [make_page(1), make_page(2)]), "keys",
                       "twice"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_invalid_argument_naming_the_field(case: str, make_daemon: DaemonFactory,
                                                       ) -> None:
    call, field, words = BAD[case]
    d = make_daemon(max_page_bytes=256 * 1024)
    for shm in (False, True):
        with KVTierClient(d.grpc_address, "errs", shared_memory=shm) as c:
            c.put([b"ok"], [make_page(7)])
            with pytest.raises(InvalidArgumentError) as info:
                call(c)
            err = info.value
            assert err.code == "INVALID_ARGUMENT"
            assert err.message.startswith(f"{field}: "), err.message
            assert words in err.message, err.message
            got = c.get([b"ok"])[0]  # the daemon still serves
            assert got is not None and np.array_equal(got.k, make_page(7).k)
            assert c.get([b"x"]) == [None]  # nothing half-stored


def test_capacity_that_cannot_be_freed_is_resource_exhausted(make_daemon: DaemonFactory) -> None:
    d = make_daemon(tiers=[TierConfig(name="hot", medium=Medium.DEVICE, codec=Codec.NONE,
                                      capacity_bytes=8 * 1024)])
    with KVTierClient(d.grpc_address, "cap") as c:
        with pytest.raises(ResourceExhaustedError) as info:
            c.put([b"big"], [make_page(1)])  # 16 KiB page, 8 KiB tier
        assert info.value.code == "RESOURCE_EXHAUSTED"
        assert c.get([b"big"]) == [None]


def test_unexpected_error_is_internal_logged_and_daemon_keeps_serving(
        daemon: Daemon, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    def explode() -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(daemon.context.store, "stats", explode)
    with KVTierClient(daemon.grpc_address, "boom") as c:
        with caplog.at_level(logging.ERROR, logger="kvtier.transport.interceptor"):
            with pytest.raises(InternalError) as info:
                c.stats()
        assert info.value.code == "INTERNAL" and "disk on fire" not in info.value.message
        rec = [r for r in caplog.records if "Stats failed unexpectedly" in r.getMessage()]
        assert rec and rec[0].exc_info is not None and "disk on fire" in str(rec[0].exc_info[1])
        c.put([b"after"], [make_page(2)])
        assert c.get([b"after"])[0] is not None
    totals = daemon.context.rpc_stats.totals()
    assert totals[("Stats", "INTERNAL")].calls == 1


def test_a_broken_invariant_is_internal_not_the_callers_conflict(
        daemon: Daemon, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvtier.errors import InternalError as BrokenInvariant

    def broken(*_args: object) -> None:
        raise BrokenInvariant("committing 10 bytes to tier 0 without a reservation", field="size")

    monkeypatch.setattr(daemon.context.store, "delete_checked", broken)
    with KVTierClient(daemon.grpc_address, "boom") as c:
        with caplog.at_level(logging.ERROR, logger="kvtier.transport.interceptor"):
            with pytest.raises(InternalError) as info:
                c.delete([b"k"])
        assert info.value.code == "INTERNAL" and "reservation" not in info.value.message
    assert any("Delete failed unexpectedly" in r.getMessage() and r.exc_info is not None
               for r in caplog.records)


def test_client_errors_are_typed_with_code_and_message() -> None:
    err = InvalidArgumentError("key: key is empty", method="Get")
    assert isinstance(err, KVTierClientError)
    assert str(err) == "Get: INVALID_ARGUMENT: key: key is empty"


@pytest.mark.parametrize("case", ["bad_length", "nan_at_the_end", "v_shape"])
def test_bad_input_in_a_chunked_put_stream(case: str, daemon: Daemon) -> None:
    shape = (4, 512, 8, 128)  # 4 MiB per tensor: more than one chunk, so PutStream is used
    k = np.ones(shape, np.float16)
    v = np.ones(shape, np.float16)
    if case == "bad_length":
        page = Page(RawTensor(k.tobytes()[:-2], "float16", shape), v)
        field = "k.data"
    elif case == "nan_at_the_end":
        v.reshape(-1)[-1] = np.nan
        page = Page(k, v)
        field = "v"
    else:
        page = Page(k, v[:, :256])
        field = "v.shape"
    with KVTierClient(daemon.grpc_address, "stream", shared_memory=False,
                      chunk_bytes=1 << 20, data_channel=False) as c:
        with pytest.raises(InvalidArgumentError) as info:
            c.put([b"s"], [page])
        assert info.value.message.startswith(f"{field}: ")
        assert c.get([b"s"]) == [None]
        good = np.ones(shape, np.float16)
        c.put([b"fine"], [Page(good, good)])
        got = c.get([b"fine"])[0]
        assert got is not None and got.k.shape == shape
    totals = daemon.context.rpc_stats.totals()
    assert totals[("PutStream", "INVALID_ARGUMENT")].calls == 1
