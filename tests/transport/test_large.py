"""Page size is limited by max_page_bytes, not by gRPC's 4 MiB message default."""

from __future__ import annotations

import numpy as np
import pytest

from kvtier.config import MiB
from kvtier_client import InvalidArgumentError, KVTierClient, Page

from .conftest import DaemonFactory

SHAPE_64MIB = (16, 1024, 8, 128)  # float16: 32 MiB per tensor, 64 MiB per page


@pytest.mark.parametrize("shm", [False, True], ids=["inline", "shm"])
def test_64mib_page_roundtrips(make_daemon: DaemonFactory, shm: bool) -> None:
    d = make_daemon(max_page_bytes=80 * MiB)
    rng = np.random.default_rng(64)
    k = rng.standard_normal(SHAPE_64MIB, dtype=np.float32).astype(np.float16)
    v = rng.standard_normal(SHAPE_64MIB, dtype=np.float32).astype(np.float16)
    with KVTierClient(d.grpc_address, "big", shared_memory=shm, shm_bytes=16 * MiB,
                      timeout_s=120) as c:
        assert c.put([b"big"], [Page(k, v, 3)]) == ["stored"]
        got = c.get([b"big"])[0]
        assert got is not None and got.tier == "hot" and got.start_position == 3
        assert got.k.shape == SHAPE_64MIB
        assert np.array_equal(got.k, k) and np.array_equal(got.v, v)
        # the segment was too small for it: the page went inline beside the shm session
        assert c.uses_shared_memory is shm


def test_page_over_the_configured_maximum_is_refused(make_daemon: DaemonFactory) -> None:
    d = make_daemon(max_page_bytes=8 * MiB)
    k = np.zeros((4, 1024, 8, 128), np.float16)  # 8 MiB per tensor: 16 MiB page
    with KVTierClient(d.grpc_address, "big") as c:
        with pytest.raises(InvalidArgumentError, match="page: .*16777216 bytes.*8388608"):
            c.put([b"too-big"], [Page(k, k)])
        assert c.get([b"too-big"]) == [None]
        small = np.ones((4, 256, 8, 128), np.float16)  # 4 MiB page: under the max, over 4 MiB
        assert c.put([b"ok"], [Page(small, small)]) == ["stored"]
