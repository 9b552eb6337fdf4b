"""The Redis tier backend: one Redis hash per page, shared by every daemon on the same Redis.

Key layout (one key per page)::

    <prefix>:<namespace>:{<key hex>}
    e.g.  kvtier:tenant-a:{9f86d081884c7d65}

The page key sits in a Redis Cluster hash tag, so pages spread over slots by their own key and
any future per-page companion key lands in the same slot; nothing in the layout is local to
one daemon. A SCAN over ``<prefix>:*`` finds every page, which is how a store that attaches
to a Redis rebuilds its index of the tier (pages survive daemon restarts).

Hash fields::

    b    the codec blob (self-describing, checksummed: see kvtier.codecs)
    p    precision the page has passed through (16, 8, 4)
    n    page size as put (k + v bytes, full precision)
    s    stored size (len of b)
    c    chain position when it was put
    w    write token: <writer id>-<random>, new on every write of the key

Deleting a page this daemon knows uses :meth:`RedisTier.delete_if` — DEL only if the write
token is still the one the index recorded (one Lua call on one key, cluster-safe). A delayed
cleanup therefore never removes a newer copy that another move (or daemon) wrote since. The
writer id (random per RedisTier) lets a store recognise copies it wrote itself: one that is not
in its index is a leftover of its own delete or move, whose cleanup is in flight, and is never
adopted again (:meth:`RedisTier.wrote`).

Failure model: every call has socket timeouts; a connection error or timeout marks the tier
down and raises :class:`~kvtier.errors.BackendUnavailable` (the store turns that into a miss).
While down no call touches the network; :meth:`RedisTier.probe` (run by the store's mover
every ``retry_interval_s``) brings it back. A key someone else deleted is a miss (None).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from kvtier.config import RedisConfig
from kvtier.errors import BackendUnavailable
from kvtier.types import Namespace, PageId, PageKey, Precision

log = logging.getLogger(__name__)

_META_FIELDS = (b"p", b"n", b"s", b"c", b"w")
_DELETE_IF = """
if redis.call('HGET', KEYS[1], 'w') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True, slots=True)
class RemoteMeta:
    """What the Redis hash records about a page besides its blob."""

    precision: Precision
    nbytes: int
    stored_bytes: int
    chain_position: int
    token: str = ""  # write token (see the module docstring); set by write(), read back


class RedisTier:
    """Pages in Redis, with an up/down state and no call that can hang."""

    def __init__(self, config: RedisConfig, url: str) -> None:
        self.config = config
        self.url = url
        self._prefix = config.prefix
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=config.socket_timeout_s,
            socket_connect_timeout=config.connect_timeout_s,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        self._delete_if = self._client.register_script(_DELETE_IF)
        self.writer_id = secrets.token_hex(4)
        self._lock = threading.Lock()
        self._up = False
        self._down_reported = False  # the outage was logged (once per outage)
        self._last_probe = float("-inf")

    # -- state --------------------------------------------------------------------------------

    @property
    def up(self) -> bool:
        return self._up

    def _mark_down(self, err: Exception) -> BackendUnavailable:
        with self._lock:
            was_up, self._up = self._up, False
            self._last_probe = time.monotonic()
            self._down_reported |= was_up
        if was_up:
            log.warning("redis tier at %s is down: %s", self.url, err)
        return BackendUnavailable(f"redis at {self.url} is unavailable: {err}", field="redis")

    def _failed(self, err: redis.RedisError) -> BackendUnavailable:
        """Connection trouble marks the tier down; any other Redis error fails this call only."""
        if isinstance(err, (redis.ConnectionError, redis.TimeoutError)):
            return self._mark_down(err)
        return BackendUnavailable(f"redis at {self.url} answered an error: {err}", field="redis")

    def probe(self, *, force: bool = False) -> bool:
        """Ping Redis if down and the retry interval has passed; True if up afterwards."""
        with self._lock:
            if self._up:
                return True
            now = time.monotonic()
            if not force and now - self._last_probe < self.config.retry_interval_s:
                return False
            self._last_probe = now
        try:
            self._client.ping()
        except redis.RedisError as e:
            with self._lock:
                report, self._down_reported = not self._down_reported, True
            if report:
                log.warning("redis tier at %s is unreachable (%s); its pages are misses and "
                            "demotions into it wait until it answers (retrying every %g s)",
                            self.url, e, self.config.retry_interval_s)
            return False
        with self._lock:
            self._up = True
            self._down_reported = False
        log.info("redis tier at %s is up", self.url)
        return True

    def _check_up(self) -> None:
        if not self._up:
            raise BackendUnavailable(f"redis at {self.url} is down", field="redis")

    def wrote(self, token: str) -> bool:
        """Whether this RedisTier wrote the copy carrying ``token``."""
        return token.startswith(self.writer_id + "-")

    def close(self) -> None:
        self._client.close()

    # -- keys ---------------------------------------------------------------------------------

    def key(self, page: PageId) -> str:
        return f"{self._prefix}:{page.namespace}:{{{page.key.hex()}}}"

    def parse_key(self, key: bytes | str) -> PageId | None:
        """The page a Redis key names, or None if it is not one of ours."""
        text = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
        head, sep, tail = text.rpartition(":")
        if not sep or not tail.startswith("{") or not tail.endswith("}"):
            return None
        prefix, sep, ns = head.rpartition(":")
        if not sep or prefix != self._prefix or not ns:
            return None
        try:
            raw = bytes.fromhex(tail[1:-1])
        except ValueError:
            return None
        return PageId(Namespace(ns), PageKey(raw)) if raw else None

    # -- data ---------------------------------------------------------------------------------

    def write(self, page: PageId, blob: bytes, meta: RemoteMeta) -> str:
        """Store (replace) a page; returns the new write token."""
        self._check_up()
        token = f"{self.writer_id}-{secrets.token_hex(6)}"
        mapping: dict[bytes, bytes | int | str] = {
            b"b": blob, b"p": int(meta.precision), b"n": meta.nbytes,
            b"s": meta.stored_bytes, b"c": meta.chain_position, b"w": token,
        }
        key = self.key(page)
        try:
            # DEL + HSET in one MULTI on one key (cluster-safe): no stale fields, no WRONGTYPE
            pipe = self._client.pipeline(transaction=True)
            pipe.delete(key)
            pipe.hset(key, mapping=mapping)  # type: ignore[arg-type]
            pipe.execute()
        except redis.RedisError as e:
            raise self._failed(e) from None
        return token

    def read(self, page: PageId) -> tuple[bytes, RemoteMeta] | None:
        """The page's blob and meta, or None if the key is gone (or is not a page of ours)."""
        self._check_up()
        try:
            vals = self._client.hmget(self.key(page), [b"b", *_META_FIELDS])
        except redis.ResponseError:
            return None  # e.g. WRONGTYPE: someone else's key under our name
        except redis.RedisError as e:
            raise self._failed(e) from None
        blob = vals[0]
        meta = _parse_meta([v if isinstance(v, bytes) else None for v in vals[1:]])
        if not isinstance(blob, bytes) or meta is None:
            return None
        return blob, meta

    def metas(self, pages: Sequence[PageId]) -> list[RemoteMeta | None]:
        """Meta of each page in one round trip (None = not in Redis)."""
        self._check_up()
        try:
            pipe = self._client.pipeline(transaction=False)
            for p in pages:
                pipe.hmget(self.key(p), list(_META_FIELDS))
            rows = pipe.execute(raise_on_error=False)
        except redis.RedisError as e:
            raise self._failed(e) from None
        return [_parse_meta(r) if isinstance(r, list) else None for r in rows]

    def delete(self, pages: Sequence[PageId]) -> int:
        """Delete pages; the number of keys that existed."""
        if not pages:
            return 0
        self._check_up()
        try:
            pipe = self._client.pipeline(transaction=False)
            for p in pages:
                pipe.delete(self.key(p))  # one command per key: keys may sit in other slots
            return sum(int(n) for n in pipe.execute())
        except redis.RedisError as e:
            raise self._failed(e) from None

    def delete_if(self, items: Sequence[tuple[PageId, str]]) -> int:
        """Delete each page whose write token is still the given one; the number deleted."""
        if not items:
            return 0
        self._check_up()
        try:
            pipe = self._client.pipeline(transaction=False)
            for p, token in items:
                self._delete_if(keys=[self.key(p)], args=[token], client=pipe)
            return sum(int(n) for n in pipe.execute())
        except redis.RedisError as e:
            raise self._failed(e) from None

    def scan(self, batch: int = 512) -> Iterator[tuple[PageId, RemoteMeta]]:
        """Every page under the prefix, with its meta (SCAN + pipelined HMGET per batch)."""
        self._check_up()
        try:
            keys: list[bytes] = []
            for key in self._client.scan_iter(match=f"{self._prefix}:*", count=batch):
                keys.append(key)
                if len(keys) >= batch:
                    yield from self._scan_batch(keys)
                    keys = []
            if keys:
                yield from self._scan_batch(keys)
        except redis.RedisError as e:
            raise self._failed(e) from None

    def _scan_batch(self, keys: list[bytes]) -> Iterator[tuple[PageId, RemoteMeta]]:
        pids = [self.parse_key(k) for k in keys]
        pipe = self._client.pipeline(transaction=False)
        for k in keys:
            pipe.hmget(k, list(_META_FIELDS))
        rows = pipe.execute(raise_on_error=False)
        for pid, row in zip(pids, rows, strict=True):
            meta = _parse_meta(row) if isinstance(row, list) else None
            if pid is not None and meta is not None:
                yield pid, meta


def _parse_meta(vals: Sequence[bytes | None]) -> RemoteMeta | None:
    if len(vals) != len(_META_FIELDS) or any(v is None for v in vals):
        return None
    try:
        prec, nbytes, stored, chain = (int(v) for v in vals[:4] if v is not None)
        token = (vals[4] or b"").decode("ascii")
        return RemoteMeta(Precision(prec), nbytes, stored, chain, token)
    except (ValueError, UnicodeDecodeError):
        return None
