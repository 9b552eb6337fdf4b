"""Block-access traces in the Mooncake format (``shared/traces/SOURCE.md``).

One JSON object per line with ``timestamp`` (ms), ``input_length``, ``output_length`` and
``hash_ids`` (the request's chain of prefix-block IDs, block 0 first). Any file of that format
loads; nothing here depends on how a particular file numbers its IDs. Bad records raise
:class:`~kvtier.errors.InvalidArgument` naming the line and the field, so a truncated or
hand-edited trace fails loudly instead of silently replaying something else.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvtier.errors import InvalidArgument

_FIELDS = ("timestamp", "input_length", "output_length", "hash_ids")


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request: when it arrived and the chain of blocks its prompt covers."""

    timestamp_ms: int
    input_length: int
    output_length: int
    blocks: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Trace:
    """A whole trace, in file order (which the format guarantees is arrival order)."""

    name: str
    requests: tuple[TraceRequest, ...]

    @property
    def accesses(self) -> int:
        return sum(len(r.blocks) for r in self.requests)

    def distinct_blocks(self) -> int:
        seen: set[int] = set()
        for r in self.requests:
            seen.update(r.blocks)
        return len(seen)

    @property
    def duration_s(self) -> float:
        if not self.requests:
            return 0.0
        return (self.requests[-1].timestamp_ms - self.requests[0].timestamp_ms) / 1000.0


def _int_field(obj: dict[str, object], name: str, where: str) -> int:
    value = obj[name]
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidArgument(f"{where}: must be a non-negative integer, got {value!r}",
                              field=name)
    return value


def parse_request(line: str, where: str = "record") -> TraceRequest:
    """One record; InvalidArgument naming the field on anything malformed."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise InvalidArgument(f"{where}: not valid JSON ({e.msg})", field="record") from None
    if not isinstance(obj, dict):
        raise InvalidArgument(f"{where}: must be a JSON object", field="record")
    for name in _FIELDS:
        if name not in obj:
            raise InvalidArgument(f"{where}: missing", field=name)
    ids = obj["hash_ids"]
    if not isinstance(ids, list) or not all(
        isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in ids
    ):
        raise InvalidArgument(f"{where}: must be a list of non-negative integers",
                              field="hash_ids")
    if len(set(ids)) != len(ids):
        raise InvalidArgument(f"{where}: a request repeats a block ID", field="hash_ids")
    return TraceRequest(
        timestamp_ms=_int_field(obj, "timestamp", where),
        input_length=_int_field(obj, "input_length", where),
        output_length=_int_field(obj, "output_length", where),
        blocks=tuple(ids),
    )


def iter_requests(lines: Sequence[str] | Iterator[str], name: str = "trace"
                  ) -> Iterator[TraceRequest]:
    last_ts = -1
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        req = parse_request(line, where=f"{name} line {n}")
        if req.timestamp_ms < last_ts:
            raise InvalidArgument(f"{name} line {n}: timestamps must not decrease",
                                  field="timestamp")
        last_ts = req.timestamp_ms
        yield req


def load_trace(path: str | Path) -> Trace:
    """Read a whole trace file. InvalidArgument (field ``trace``) if it cannot be read."""
    p = Path(path)
    try:
        with p.open() as f:
            requests = tuple(iter_requests(f, name=p.name))
    except OSError as e:
        raise InvalidArgument(f"cannot read {p}: {e.strerror}", field="trace") from None
    if not requests:
        raise InvalidArgument(f"{p} holds no requests", field="trace")
    return Trace(name=p.name, requests=requests)
