"""``kvtier replay`` end to end: JSON stable for a seed, --tiers, --compare, --live, errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from kvtier.cli import main
from kvtier.lab.replay.trace import load_trace

from .helpers import make_trace, write_trace


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Conversation-like: shared system prefix, multi-turn chains, one-off requests."""
    rng = random.Random(11)
    next_id = 1
    convs: list[list[int]] = []
    chains: list[list[int]] = []
    for _ in range(500):
        if convs and rng.random() < 0.5:
            c = rng.choice(convs)
            c[-1] = next_id  # the partial last block re-hashes on the next turn
            c += list(range(next_id + 1, next_id + 1 + rng.randrange(1, 3)))
            next_id = c[-1] + 1
        else:
            n = rng.randrange(2, 9)
            c = [0] + list(range(next_id, next_id + n))
            next_id += n
            convs.append(c)
        chains.append(list(c))
    return write_trace(tmp_path_factory.mktemp("trace") / "conv.jsonl", make_trace(*chains))


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, object]:
    assert main(["replay", *argv]) == 0
    out: dict[str, object] = json.loads(capsys.readouterr().out)
    return out


def test_json_is_stable_for_a_seed(trace_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [str(trace_file), "--json", "--seed", "4", "--capacity", "0.1", "--policy", "learned"]
    first = _run(capsys, *args)
    assert _run(capsys, *args) == first
    trace = load_trace(trace_file)
    assert first["accesses"] == trace.accesses
    assert first["capacity_blocks"] == int(0.1 * trace.distinct_blocks())
    for key in ("policy", "hits", "hit_ratio"):
        assert key in first


def test_tier_stack_reports_hits_per_tier(trace_file: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = _run(capsys, str(trace_file), "--json", "--tiers", "--capacity", "230",
               "--policy", "lru")
    tiers = out["tiers"]
    assert isinstance(tiers, dict) and list(tiers) == ["hot", "warm", "cold", "remote"]
    assert sum(tiers.values()) == out["hits"]
    assert out["tier_capacities"] == {"hot": 10, "warm": 20, "cold": 40, "remote": 160}


def test_compare_table_has_cis_and_gap_closed(trace_file: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = _run(capsys, str(trace_file), "--json", "--compare", "--capacity", "0.05,40",
               "--resamples", "200", "--seed", "1")
    tables = out["compare"]
    assert isinstance(tables, list) and len(tables) == 2
    for table in tables:
        rows = {r["policy"]: r for r in table["rows"]}
        assert set(rows) == {"lru", "lfu", "arc", "s3fifo", "chain-lru", "learned",
                             "learned+hints", "belady"}
        assert rows["lru"]["gap_closed"] == 0.0 and rows["belady"]["gap_closed"] == 1.0
        for r in rows.values():
            low, high = r["ci95"]
            assert low <= r["prefix_hit_ratio"] <= high
            assert r["prefix_hit_ratio"] <= r["hit_ratio"]
            assert r["hit_ratio"] <= rows["belady"]["hit_ratio"]
    assert main(["replay", str(trace_file), "--compare", "--capacity", "40",
                 "--resamples", "50"]) == 0
    text = capsys.readouterr().out
    assert "gap closed" in text and "belady" in text


def test_live_replay_against_a_daemon_it_starts(trace_file: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = _run(capsys, str(trace_file), "--json", "--live", "--limit", "60", "--capacity",
               "300", "--policy", "lru", "--page-bytes", "1024")
    assert out["mode"] == "live" and out["policy"] == "lru"
    assert out["requests"] == 60 and 0 < out["hits"] <= out["present"]
    tiers = out["tiers"]
    assert isinstance(tiers, dict) and sum(tiers.values()) == out["hits"]
    assert out["bytes_got"] == out["hits"] * 1024
    assert set(out["get_latency_ms"]) == {"p50", "p95", "p99"}


@pytest.mark.parametrize(("line", "field"), [
    ('{"timestamp": 0, "input_length": 5, "output_length": 1}', "hash_ids"),
    ('{"timestamp": -1, "input_length": 5, "output_length": 1, "hash_ids": [0]}', "timestamp"),
    ('{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [0, 0]}', "hash_ids"),
    ('{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": ["a"]}', "hash_ids"),
    ("not json", "record"),
])
def test_bad_traces_name_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   line: str, field: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    assert main(["replay", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{field}:" in err and "line 1" in err


def test_bad_capacity_is_rejected(trace_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", str(trace_file), "--capacity", "abc"]) == 2
    assert "capacity" in capsys.readouterr().err


def test_costs_reports_decision_and_learning_figures(trace_file: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = _run(capsys, str(trace_file), "--json", "--costs")
    assert out["candidates"] == 64 and out["accesses"] == load_trace(trace_file).accesses
    assert 0 < out["decision_us_min"] <= out["decision_us_p50"] <= out["decision_us_p99"]
    assert out["learn_cpu_s"] > 0 and out["core_share"] > 0


def test_the_shipped_trace_is_the_documented_one(capsys: pytest.CaptureFixture[str]) -> None:
    """The conversation trace the docs replay ships with kvtier (xz), byte for byte the
    Mooncake file its SOURCE.md names."""
    import hashlib
    import lzma
    import re

    import kvtier.lab.replay

    here = Path(kvtier.lab.replay.__file__).parent / "traces"
    shipped = here / "conversation_trace.jsonl.xz"
    want = re.search(r"sha256\s+`([0-9a-f]{64})`", (here / "SOURCE.md").read_text())
    assert want is not None
    assert hashlib.sha256(lzma.decompress(shipped.read_bytes())).hexdigest() == want.group(1)
    trace = load_trace(shipped)
    assert (trace.name, len(trace.requests)) == ("conversation_trace.jsonl", 12031)
    out = _run(capsys, str(shipped), "--limit", "300", "--policy", "lru", "--json")
    assert out["trace"] == "conversation_trace.jsonl" and out["accesses"]
