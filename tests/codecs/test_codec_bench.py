"""``kvtier bench codecs`` reports the issue's keys, the ratios it targets and both baselines."""

from __future__ import annotations

from kvtier.bench import codecs as bench
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
        assert r["int4a"]["ratio"] >= 3.5
        for codec in ("int8", "int4", "int4a"):
            x = r[codec]
            assert x["encode_gbps"] > 0 and x["decode_gbps"] > 0
            assert abs(x["decode_vs_memcpy"] - x["decode_gbps"] / r["memcpy_gbps"]) < 0.01
    assert set(res["int8"]) == set(res["int4a"]) == {"encode_gbps", "decode_gbps", "ratio"}
