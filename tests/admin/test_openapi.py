"""The OpenAPI schema tells the truth: requests generated from the live ``/openapi.json``.

For every operation the generator builds requests from the schema itself: path parameters that
match their declared pattern and ones that do not, bodies that fit the request schema and
bodies that break it one property at a time (wrong JSON types, out-of-range numbers, unknown
fields, not an object, not JSON), each with no token, a bogus token, a tenant token granted the
namespace, another tenant's token and the admin token. Every answer must be a status the schema
lists for the operation (never 500), and every error the schema's error body. Then every method
a path does not have must be a 405 whose ``Allow`` names exactly the methods it has.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kvtier.transport.auth.tokens import TokenFile, TokenRegistry

from .conftest import AUTH, NS, Admin, make_settings, put_pages

SEED = 15
PER_OPERATION = 150  # requests per operation (about 2,000 in all), beside the 405 probes

PATH_VALUES = [NS, "tenant-b", "a000", "a001", "ffff", "00", "hot", "warm", "cold", "remote",
               "zz", "abc", "x", "..", ".x", "a..b", "ｔenant", "-", "A" * 129, "ab" * 1100,
               "%20", "0" * 64]
STRINGS = ["hot", "warm", "cold", "remote", "lru", "lfu", "nope", "", "x" * 65, "HOT", "ｈot"]
WRONG = [True, False, None, 1.5, -1, 0, 2**63, 2**70, "1", [], {}, [0.5], float("inf")]


def _resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    node: Any = spec
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return dict(node)


def _valid_value(spec: dict[str, Any], schema: dict[str, Any], rng: random.Random) -> Any:
    """A value of ``schema`` (the admin API's simple shapes: scalars, nullable scalars)."""
    options = schema.get("anyOf") or [schema]
    option = _resolve(spec, rng.choice(options))
    kind = option.get("type")
    if kind == "null":
        return None
    if kind == "integer":
        lo = option.get("exclusiveMinimum", option.get("minimum", -10))
        hi = option.get("maximum", 2**63 - 1)
        return rng.choice([int(lo) + 1, 4096, 65536, int(hi)])
    if kind == "number":
        lo = float(option.get("minimum", option.get("exclusiveMinimum", 0.0)))
        hi = float(option.get("maximum", option.get("exclusiveMaximum", 1.0)))
        return rng.choice([round(lo + (hi - lo) * f, 3) for f in (0.1, 0.5, 0.9)])
    if kind == "string":
        return rng.choice(STRINGS[:7])
    if kind == "boolean":
        return rng.choice([True, False])
    return None


def _bodies(spec: dict[str, Any], op: dict[str, Any], rng: random.Random
            ) -> Iterator[tuple[str, bytes | None]]:
    """(what, raw JSON body) pairs for ``op``: valid ones, then each way to break them."""
    if "requestBody" not in op:
        while True:
            yield "no body", None
    schema = _resolve(spec, op["requestBody"]["content"]["application/json"]["schema"])
    props: dict[str, Any] = schema.get("properties", {})
    required = set(schema.get("required", []))
    while True:
        body = {name: _valid_value(spec, p, rng) for name, p in props.items()
                if name in required or rng.random() < 0.6}
        yield "valid", json.dumps(body).encode()
        name = rng.choice(list(props))
        broken = dict(body)
        broken[name] = rng.choice(WRONG)
        yield f"{name}={broken[name]!r}", json.dumps(broken).encode()
        yield "unknown field", json.dumps({**body, "bogus": 1}).encode()
        yield "not an object", json.dumps(rng.choice([[1], "x", 3, None])).encode()
        yield "not JSON", rng.choice([b"{not json", b"", b"{\"a\":", b"\xff\xfe"])


def _conforms(schema: dict[str, Any], value: str) -> bool:
    pattern = schema.get("pattern")
    return (pattern is None or re.fullmatch(pattern, value) is not None) and len(value) <= int(
        schema.get("maxLength", 1 << 30))


def _check_error(r: Any, status: int, where: str) -> None:
    body = r.json()
    assert set(body) == {"error"}, where
    err = body["error"]
    assert set(err) == {"code", "status", "message", "field"}, where
    assert err["status"] == status and isinstance(err["code"], str) and err["message"], where
    assert err["field"] is None or isinstance(err["field"], str), where
    if status == 401:
        assert r.headers["www-authenticate"].startswith("Bearer"), where


@pytest.fixture()
def live(start_admin: Callable[..., Admin], redis_url: str, tmp_path: Path
         ) -> tuple[Admin, dict[str, dict[str, str]]]:
    path = tmp_path / "tokens.json"
    f = TokenFile(path)
    a, _ = f.create([NS])
    b, _ = f.create(["tenant-b"])
    admin = start_admin(make_settings(redis_url))
    object.__setattr__(admin.context, "tokens", TokenRegistry(path, 0.05))
    put_pages(admin, 2)
    headers = {"none": {}, "bogus": {"Authorization": "Bearer kvt_bogus"},
               "malformed": {"Authorization": "Token abc"},
               "tenant": {"Authorization": f"Bearer {a}"},
               "other": {"Authorization": f"Bearer {b}"}, "admin": AUTH}
    return admin, headers


def test_generated_requests_get_only_documented_answers(
        live: tuple[Admin, dict[str, dict[str, str]]]) -> None:
    admin, headers = live
    spec = admin.http.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert "HTTPValidationError" not in json.dumps(spec)
    rng = random.Random(SEED)
    sent = 0
    seen: set[tuple[str, str, int]] = set()
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            params = [p for p in op.get("parameters", []) if p["in"] == "path"]
            bodies = _bodies(spec, op, rng)
            for _ in range(PER_OPERATION):
                values = {p["name"]: rng.choice(PATH_VALUES) for p in params}
                url = path
                for name, value in values.items():
                    url = url.replace("{" + name + "}", value)
                what, body = next(bodies)
                who = rng.choice(list(headers))
                # a fresh connection per request: a kept-alive one waits ~40 ms for delayed ACKs
                hdrs = {**headers[who], "Connection": "close"}
                if body is not None:
                    hdrs["Content-Type"] = "application/json"
                r = admin.http.request(method.upper(), url, content=body, headers=hdrs)
                sent += 1
                where = f"{method.upper()} {url} [{who}, {what}] -> {r.status_code}: {r.text}"
                assert r.status_code != 500, where
                assert str(r.status_code) in op["responses"], where
                seen.add((method, path, r.status_code))
                if r.status_code >= 400 and not (path == "/readyz" and r.status_code == 503):
                    _check_error(r, r.status_code, where)
                elif r.headers.get("content-type", "").startswith("application/json"):
                    r.json()
                bad_path = not all(_conforms(p["schema"], values[p["name"]]) for p in params)
                if bad_path and who == "admin":
                    assert 400 <= r.status_code < 500, where
                if op.get("security") and who in ("none", "malformed") and r.status_code < 400:
                    raise AssertionError(f"served without a token: {where}")
    assert sent >= 1900
    # the generator reached the answers that matter, not only refusals
    statuses = {s for _, _, s in seen}
    assert {200, 400, 401, 403, 404, 422}.issubset(statuses), sorted(statuses)


def test_every_other_method_is_405_with_the_paths_methods(
        live: tuple[Admin, dict[str, dict[str, str]]]) -> None:
    admin, headers = live
    spec = admin.http.get("/openapi.json").json()
    for path, ops in spec["paths"].items():
        url = path.replace("{namespace}", NS).replace("{key_hex}", "a000").replace(
            "{name}", "hot")
        documented = {m.upper() for m in ops}
        for method in sorted({"GET", "PUT", "POST", "PATCH", "DELETE"} - documented):
            for who in ("none", "admin"):
                r = admin.http.request(method, url,
                                       headers={**headers[who], "Connection": "close"})
                where = f"{method} {url} [{who}]"
                assert r.status_code == 405, where
                _check_error(r, 405, where)
                assert set(r.headers["allow"].split(", ")) == documented, where


def test_generated_values_cover_both_sides_of_each_pattern() -> None:
    """The path values include matches and misses of every declared pattern."""
    from kvtier.admin.app import KEY_HEX_PATTERN, NAMESPACE_PATTERN, TIER_PATTERN

    for pattern in (KEY_HEX_PATTERN, NAMESPACE_PATTERN, TIER_PATTERN):
        hits = [v for v in PATH_VALUES if re.fullmatch(pattern, v)]
        misses = [v for v in PATH_VALUES if not re.fullmatch(pattern, v)]
        assert hits and misses, pattern
    assert list(itertools.islice(_bodies({}, {}, random.Random(0)), 2)) == [("no body", None)] * 2
