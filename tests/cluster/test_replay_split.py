"""`kvtier replay --live` split over two daemons on one cluster counts cross-daemon hits."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvtier.config import Settings
from kvtier.daemon import Daemon
from kvtier.lab.replay.live import replay_live
from kvtier.lab.replay.trace import Trace, TraceRequest

from .helpers import settings


def conversations(turns: int = 60) -> Trace:
    """Four conversations whose prompts grow by a block a turn, interleaved."""
    reqs = []
    for t in range(turns):
        c = t % 4
        blocks = (0, *range(1000 * (c + 1), 1000 * (c + 1) + 2 + t // 4))
        reqs.append(TraceRequest(timestamp_ms=t, input_length=512 * len(blocks),
                                 output_length=1, blocks=blocks))
    return Trace("conversations", tuple(reqs))


@pytest.fixture()
def pair(cluster_url: str, request: pytest.FixtureRequest) -> Iterator[list[Daemon]]:
    # memory enough for the whole replay: a page reaches the shared tier only if shared on put
    base = settings(cluster_url, hot_pages=1 << 14, share_puts=request.param)
    started = [Daemon(Settings(**{**base.model_dump(), "grpc_port": 0})).start()
               for _ in range(2)]
    yield started
    for d in started:
        d.stop(grace_s=1.0)


@pytest.mark.parametrize("pair", [True], indirect=True)
def test_shared_pages_hit_on_the_other_daemon(pair: list[Daemon]) -> None:
    r = replay_live(conversations(), [d.grpc_address for d in pair], page_bytes=1024, seed=3)
    assert r.daemons == 2 and r.hits > 0
    assert 0 < r.cross_hits <= r.tiers.get("remote", 0) <= r.hits
    assert r.to_json()["cross_daemon_hit_ratio"] == round(r.cross_hits / r.accesses, 6)


@pytest.mark.parametrize("pair", [False], indirect=True)
def test_without_sharing_each_daemon_hits_only_its_own(pair: list[Daemon]) -> None:
    r = replay_live(conversations(), [d.grpc_address for d in pair], page_bytes=1024, seed=3)
    assert r.daemons == 2 and r.hits > 0 and r.cross_hits == 0 and "remote" not in r.tiers
