"""``kvtier bench codecs`` reports the issue's keys, the ratios it targets and both baselines."""

from __future__ import annotations

import threading

import pytest

from kvtier.lab.bench import codecs as bench
from kvtier.config import CodecConfig


def test_bench_reports_issue_keys_and_ratio_targets() -> None:
    res = bench.run(["64KiB", "2MiB"], total_mib=4, repeat=1, params=CodecConfig(), clock="thread")
    assert res["headline_size"] == "2MiB" and res["clock"] == "thread"
    assert res["memcpy_gbps"] > 0 and res["memcpy_torch_gbps"] > 0
    for size in ("64KiB", "2MiB"):
        r = res["sizes"][size]
        assert r["page_bytes"] == {"64KiB": 64 << 10, "2MiB": 2 << 20}[size]
        assert r["working_set_bytes"] >= 4 << 20
        assert r["int8"]["ratio"] >= 1.9 and r["int4"]["ratio"] >= 3.5  # all metadata counted
        assert r["int4a"]["ratio"] >= 3.5 and r["int3"]["ratio"] >= 4.5
        for codec in ("int8", "int4", "int4a", "int3"):
            x = r[codec]
            assert x["encode_gbps"] > 0 and x["decode_gbps"] > 0
            assert abs(x["decode_vs_memcpy"] - x["decode_gbps"] / r["memcpy_gbps"]) < 0.01
    assert set(res["int8"]) == set(res["int4a"]) == {"encode_gbps", "decode_gbps", "ratio"}


def test_bench_two_threads_reports_the_same_shape() -> None:
    res = bench.run(["2MiB"], total_mib=8, repeat=1, params=CodecConfig(), clock="wall",
                    threads=2)
    assert res["threads"] == 2 and res["headline_size"] == "2MiB"
    assert res["memcpy_gbps"] > 0 and res["memcpy_torch_gbps"] > 0
    r = res["sizes"]["2MiB"]
    assert r["pages"] == 4 and r["working_set_bytes"] == 8 << 20  # two pages a thread
    for codec in ("int8", "int4", "int4a"):
        assert set(res[codec]) == {"encode_gbps", "decode_gbps", "ratio"}
        x = r[codec]
        assert x["encode_gbps"] > 0 and x["decode_gbps"] > 0
        assert x["encode_spread"]["worst"] > 0 and x["decode_spread"]["worst"] > 0
    assert r["int8"]["ratio"] >= 1.9 and r["int4"]["ratio"] >= 3.5


def test_two_threads_refuse_the_thread_clock() -> None:
    with pytest.raises(ValueError, match="wall clock only"):
        bench.run(["64KiB"], total_mib=1, repeat=1, params=CodecConfig(), clock="thread",
                  threads=2)


def test_shares_split_pages_disjointly_and_evenly() -> None:
    shares = bench._shares(7, 3)
    assert [list(s) for s in shares] == [[0, 1], [2, 3], [4, 5, 6]]
    assert [list(s) for s in bench._shares(1, 2)] == [[], [0]]


def test_an_error_in_a_worker_thread_reaches_the_caller() -> None:
    def boom(i: int) -> None:
        if i == 3:
            raise RuntimeError("page 3")

    with pytest.raises(RuntimeError, match="page 3"):
        bench._time([boom, boom], n=4, nbytes=1, repeat=1)


def test_each_page_is_worked_once_by_the_thread_that_owns_its_share() -> None:
    seen: list[tuple[int, int]] = []
    lock = threading.Lock()

    def work(i: int) -> None:
        with lock:
            seen.append((threading.get_ident(), i))

    bench._time([work] * 3, n=10, nbytes=1, repeat=1)
    assert sorted(i for _, i in seen) == list(range(10))
    owners = {i: t for t, i in seen}
    shares = bench._shares(10, 3)
    assert all(len({owners[i] for i in s}) == 1 for s in shares)  # a share stays on one thread
    assert len({owners[s[0]] for s in shares}) == 3  # and each share has its own thread
