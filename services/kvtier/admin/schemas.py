"""Request bodies and JSON views of the admin API.

Bodies are pydantic models with ``extra="forbid"`` (a misspelt field is a 422 naming it, not a
silent no-op). Views turn the core's frozen dataclasses into plain JSON: enums by value,
precision by name (``full``, ``int8``, ``int4``), keys as hex.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

from kvtier.store.policy import PolicyStatus

MAX_SIZE = 2**63 - 1  # the largest byte count the wire (int64) and the daemon's counters hold


class TierLimits(BaseModel):
    """``PATCH /v1/tiers/{name}``: any subset of the tier's limits.

    Strict types: a size is a JSON integer and a ratio a JSON number; ``true``, ``1.0`` as a
    size or ``"1"`` are refused (422), never coerced."""

    model_config = ConfigDict(extra="forbid")

    capacity_bytes: StrictInt | None = Field(
        default=None, gt=0, le=MAX_SIZE, description="New byte capacity (1 .. 2**63-1).")
    high_watermark: StrictFloat | None = Field(
        default=None, gt=0.0, le=1.0, allow_inf_nan=False,
        description="Fill ratio above which the mover demotes."
    )
    low_watermark: StrictFloat | None = Field(
        default=None, ge=0.0, lt=1.0, allow_inf_nan=False,
        description="Fill ratio the mover demotes down to."
    )


class MoveRequest(BaseModel):
    """``POST .../promote`` and ``POST .../demote``: the target tier."""

    model_config = ConfigDict(extra="forbid")

    tier: StrictStr = Field(min_length=1, max_length=64, description="Target tier name.")


class PolicyChoice(BaseModel):
    """``PUT /v1/policy``: the policy to switch to (see ``GET /v1/policy`` for the names)."""

    model_config = ConfigDict(extra="forbid")

    name: StrictStr = Field(min_length=1, max_length=64)


class ErrorDetail(BaseModel):
    """What went wrong: the gRPC-style code, the HTTP status, a message, the field at fault."""

    code: str = Field(description="Status name, e.g. INVALID_ARGUMENT, PERMISSION_DENIED.")
    status: int = Field(description="The HTTP status of the response.")
    message: str
    field: str | None = Field(description="The input at fault, when one is.")


class ErrorBody(BaseModel):
    """Every error response of the admin API: ``{"error": {...}}``."""

    error: ErrorDetail


def jsonable(value: Any) -> Any:
    """Plain JSON of a value object: dataclasses, enums, mappings, sequences, bytes (as hex)."""
    if isinstance(value, enum.IntEnum):
        return value.name.lower()
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, Mapping):
        return {_key(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_asdict"):  # a NamedTuple, e.g. PageId
        return {k: jsonable(v) for k, v in value._asdict().items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/Inf; "no value" is what they mean here
    return value


def _key(k: Any) -> str:
    if isinstance(k, tuple):
        return "/".join(str(jsonable(x)) for x in k)
    return str(jsonable(k))


def tier_view(tier: Any) -> dict[str, Any]:
    """One tier: limits, occupancy and counters."""
    view: dict[str, Any] = jsonable(tier)
    cap = int(tier.capacity_bytes)
    view["fill_ratio"] = (int(tier.bytes) / cap) if cap > 0 else 0.0
    return view


def policy_view(status: PolicyStatus, available: list[str]) -> dict[str, Any]:
    view: dict[str, Any] = jsonable(status)
    view["available"] = available
    return view


def stats_view(stats: Any) -> dict[str, Any]:
    """The whole store snapshot; codec time as a list of ``{op, codec, seconds, count}``."""
    view: dict[str, Any] = jsonable(stats)
    view["tiers"] = [tier_view(t) for t in stats.tiers]
    view["codec_seconds"] = [
        {"op": jsonable(op), "codec": jsonable(codec), "seconds": secs, "count": count}
        for (op, codec), (secs, count) in sorted(stats.codec_seconds.items())
    ]
    return view
