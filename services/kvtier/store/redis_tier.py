"""The Redis tier backend: one Redis hash per page, shared by every daemon on the same Redis or
Redis Cluster.

Key layout (one key per page)::

    <prefix>:<namespace>:{<key hex>}
    e.g.  kvtier:tenant-a:{9f86d081884c7d65}

The page key sits in a Redis Cluster hash tag, so pages spread over slots by their own key and
everything about one page (its one key, any future companion key) lands in one slot, which is
what lets a page be written and deleted atomically by a script on one node. Nothing in the
layout is local to one daemon. A SCAN over ``<prefix>:*`` on every primary finds every page,
which is how a store that attaches rebuilds its view of the tier.

Hash fields::

    b    the codec blob (self-describing, checksummed: see kvtier.codecs)
    p    precision the page has passed through (16, 8, 4)
    n    page size as put (k + v bytes, full precision)
    s    stored size (len of b)
    c    chain position when it was put
    w    write token: <writer id>-<random>, new on every write of the key

Shared-cache semantics (pages are immutable and content-addressed: a key names the same bytes
for every daemon):

- a write replaces the whole hash in one script (atomic on its node), with a TTL when
  ``ttl_s`` is set. Two daemons writing the same key at once both succeed; the last script to
  run wins and a reader sees one whole hash or the other, never a mix. Both hold the same
  page, so either is right; only the write token differs;
- a read is HMGET of the fields: a missing key or a hash that is not ours is a miss (None);
- :meth:`RedisTier.delete` removes keys whatever their token (a delete removes the page
  everywhere); :meth:`RedisTier.delete_if` removes a key only if its token is still the given
  one, for cleanups that must not remove a copy someone wrote since (a corrupt copy, a write
  whose page was deleted while it was in flight). A delete whose shard cannot be reached is
  kept and sent again once the shard answers (``deletes_pending``); deletes that fail are
  counted (``delete_failures``), and pending ones pushed out of a full queue too
  (``deletes_dropped``). So a delete is never silently lost; the one case it can come late
  is a shard that was down, and a page put again meanwhile is then removed too (a later
  miss, never wrong data);
- capacity belongs to Redis (``maxmemory`` with an ``allkeys-lru`` policy, and ``ttl_s``);
  a daemon never deletes a shared page because its own count of the tier is full.

Failure model: every call has socket timeouts; batches go through
:class:`~kvtier.store.redis_shards.Shards`, which answers per key, so with a cluster one dead
shard fails only the keys in its slots. A key whose shard is unavailable is a miss for reads and
:class:`~kvtier.errors.BackendUnavailable` for writes. With every shard down (or a single Redis
down) no call touches the network; :meth:`RedisTier.probe` (run by the store's mover) brings the
tier back and retries pending deletes (at most once per ``retry_interval_s``).
"""

from __future__ import annotations

import collections
import logging
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from redis import RedisError
from redis.exceptions import OutOfMemoryError, ResponseError

from kvtier.config import RedisConfig
from kvtier.errors import BackendUnavailable
from kvtier.store.redis_shards import (
    UNAVAILABLE, Command, RedisHealth, Script, Shards, Unavailable,
)
from kvtier.types import Namespace, PageId, PageKey, Precision

log = logging.getLogger(__name__)

_META_FIELDS = (b"p", b"n", b"s", b"c", b"w")
# A hash of ours always has exactly these fields, so HSET of all of them replaces the page;
# a key of another type under our name is removed first. Nothing is deleted before the HSET,
# so a write refused for memory (maxmemory with noeviction) leaves the old copy whole.
_WRITE = Script.of("""
if redis.call('TYPE', KEYS[1]).ok ~= 'hash' then redis.call('DEL', KEYS[1]) end
redis.call('HSET', KEYS[1], 'b', ARGV[1], 'p', ARGV[2], 'n', ARGV[3], 's', ARGV[4],
           'c', ARGV[5], 'w', ARGV[6])
if tonumber(ARGV[7]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[7])
else redis.call('PERSIST', KEYS[1]) end
return 1
""")
_DELETE_IF = Script.of("""
if redis.call('HGET', KEYS[1], 'w') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
""")
PENDING_DELETES = 65536


@dataclass(frozen=True, slots=True)
class RemoteMeta:
    """What the Redis hash records about a page besides its blob."""

    precision: Precision
    nbytes: int
    stored_bytes: int
    chain_position: int
    token: str = ""  # write token (see the module docstring); set by write(), read back


@dataclass(frozen=True, slots=True)
class Found:
    """A page found in Redis: its meta, and its blob when it was asked for."""

    meta: RemoteMeta
    blob: bytes | None


@dataclass(frozen=True, slots=True)
class DeleteCounters:
    failures: int  # delete commands that failed (unreachable shard, error reply)
    pending: int  # deletes waiting for their shard
    dropped: int  # pending deletes pushed out of a full queue


class RedisTier:
    """Pages in Redis: per-key answers, health per shard, and no call that can hang."""

    def __init__(self, config: RedisConfig, url: str) -> None:
        self.config = config
        self.url = url
        self._prefix = config.prefix
        self._ttl_ms = int(config.ttl_s * 1000) if config.ttl_s else 0
        self.shards = Shards(config, url)
        self.writer_id = secrets.token_hex(4)
        self._lock = threading.Lock()
        self._pending: collections.deque[tuple[PageId, str | None]] = collections.deque()
        self._delete_failures = 0
        self._deletes_dropped = 0
        self._last_retry = float("-inf")

    # -- state --------------------------------------------------------------------------------

    @property
    def up(self) -> bool:
        """Some shard answers (a single Redis: it answers)."""
        return self.shards.up

    def health(self) -> RedisHealth:
        return self.shards.health()

    def probe(self, *, force: bool = False) -> bool:
        """Reconnect, refresh the cluster's slot map and ping nodes that were down (at most
        once per ``retry_interval_s`` unless ``force``; no network when all is well), then send
        the deletes that waited for their shard. True if the tier is up."""
        up = self.shards.probe(force=force)
        now = time.monotonic()
        if up and self._pending and now - self._last_retry >= self.config.retry_interval_s:
            self._last_retry = now
            self._retry_pending()
        return up

    def _check_up(self) -> None:
        if not self.shards.up:
            raise BackendUnavailable(f"redis at {self.url} is down", field="redis")

    def delete_counters(self) -> DeleteCounters:
        with self._lock:
            return DeleteCounters(self._delete_failures, len(self._pending),
                                  self._deletes_dropped)

    def close(self) -> None:
        self.shards.close()

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
        """Store (replace) a page; returns the new write token. BackendUnavailable if its
        shard cannot take it (down, or out of memory with no eviction policy)."""
        got = self.write_many([(page, blob, meta)])[0]
        if isinstance(got, BackendUnavailable):
            raise got
        return got

    def write_many(self, items: Sequence[tuple[PageId, bytes, RemoteMeta]]
                   ) -> list[str | BackendUnavailable]:
        """Store (replace) pages in one round trip; per page its new write token, or the
        error (not raised) that kept it out."""
        if not items:
            return []
        self._check_up()
        tokens = [f"{self.writer_id}-{secrets.token_hex(6)}" for _ in items]
        replies = self.shards.run([
            Command.evalsha(_WRITE, self.key(page), blob, int(meta.precision), meta.nbytes,
                            meta.stored_bytes, meta.chain_position, token, self._ttl_ms)
            for (page, blob, meta), token in zip(items, tokens, strict=True)])
        out: list[str | BackendUnavailable] = []
        for (page, _, _), token, reply in zip(items, tokens, replies, strict=True):
            if reply is UNAVAILABLE:
                out.append(BackendUnavailable(
                    f"the redis shard of {self.key(page)} is unavailable", field="redis"))
            elif isinstance(reply, OutOfMemoryError):
                out.append(BackendUnavailable(
                    f"redis is full (maxmemory without eviction): {reply}", field="redis"))
            elif isinstance(reply, ResponseError):
                out.append(BackendUnavailable(f"redis refused a page write: {reply}",
                                              field="redis"))
            else:
                out.append(token)
        return out

    def fetch(self, pages: Sequence[PageId], *,
              blobs: bool) -> list[Found | None | Unavailable]:
        """Each page's meta (and blob with ``blobs``) in one round trip: :class:`Found`, None
        (not in Redis, or not a page of ours), or UNAVAILABLE when its shard could not be
        asked."""
        if not pages:
            return []
        self._check_up()
        fields = [b"b", *_META_FIELDS] if blobs else list(_META_FIELDS)
        replies = self.shards.run([Command(k, ("HMGET", k, *fields))
                                   for k in map(self.key, pages)])
        out: list[Found | None | Unavailable] = []
        for reply in replies:
            if reply is UNAVAILABLE:
                out.append(UNAVAILABLE)
                continue
            if not isinstance(reply, list):
                out.append(None)  # e.g. WRONGTYPE: someone else's key under our name
                continue
            blob = reply[0] if blobs else None
            meta = _parse_meta(reply[1:] if blobs else reply)
            if meta is None or (blobs and not isinstance(blob, bytes)):
                out.append(None)
            else:
                out.append(Found(meta, blob))
        return out

    def read(self, page: PageId) -> tuple[bytes, RemoteMeta] | None:
        """The page's blob and meta, or None if the key is gone (or is not a page of ours).
        BackendUnavailable if its shard cannot be asked."""
        got = self.fetch([page], blobs=True)[0]
        if got is UNAVAILABLE:
            raise BackendUnavailable(f"the redis shard of {self.key(page)} is unavailable",
                                     field="redis")
        if not isinstance(got, Found) or got.blob is None:
            return None
        return got.blob, got.meta

    def metas(self, pages: Sequence[PageId]) -> list[RemoteMeta | None]:
        """Meta of each page in one round trip (None = not in Redis, or unreachable)."""
        return [g.meta if isinstance(g, Found) else None
                for g in self.fetch(pages, blobs=False)]

    def delete(self, pages: Sequence[PageId]) -> set[PageId]:
        """Delete pages whatever their write token; the ones whose key existed. Deletes that
        cannot be sent now are kept for later (see the module docstring)."""
        return self._delete([(p, None) for p in pages])

    def delete_if(self, items: Sequence[tuple[PageId, str]]) -> int:
        """Delete each page whose write token is still the given one; the number deleted."""
        return len(self._delete(list(items)))

    def _delete(self, items: Sequence[tuple[PageId, str | None]]) -> set[PageId]:
        if not items:
            return set()
        if not self.shards.up:
            self._keep(items)
            return set()
        commands = [Command(k, ("DEL", k)) if token is None
                    else Command.evalsha(_DELETE_IF, k, token)
                    for k, token in ((self.key(p), t) for p, t in items)]
        done = set()
        failed = []
        for item, reply in zip(items, self.shards.run(commands), strict=True):
            if isinstance(reply, int):
                if reply:
                    done.add(item[0])
            else:
                failed.append(item)
        if failed:
            self._keep(failed)
        return done

    def _keep(self, items: Sequence[tuple[PageId, str | None]]) -> None:
        with self._lock:
            self._delete_failures += len(items)
            for item in items:
                if len(self._pending) >= PENDING_DELETES:
                    self._pending.popleft()
                    self._deletes_dropped += 1
                self._pending.append(item)
        log.debug("%d redis deletes kept for later", len(items))

    def _retry_pending(self) -> None:
        with self._lock:
            items = list(self._pending)
            self._pending.clear()
        commands = [Command(self.key(p), ("DEL", self.key(p))) if token is None
                    else Command.evalsha(_DELETE_IF, self.key(p), token)
                    for p, token in items]
        replies = self.shards.run(commands, count=False)
        still = [item for item, reply in zip(items, replies, strict=True)
                 if not isinstance(reply, int)]
        if still:
            with self._lock:
                self._pending.extendleft(reversed(still))  # not counted twice as failures
                while len(self._pending) > PENDING_DELETES:
                    self._pending.popleft()
                    self._deletes_dropped += 1

    def scan(self, batch: int = 512) -> Iterator[tuple[PageId, RemoteMeta]]:
        """Every page under the prefix on every primary, with its meta (SCAN per node, metas
        one round trip per batch). Raises BackendUnavailable at the end if some primary could
        not be scanned whole (what was found before is still yielded)."""
        self._check_up()
        failed = []
        for name, client in self.shards.primaries():
            keys: list[bytes] = []
            try:
                for key in client.scan_iter(match=f"{self._prefix}:*", count=batch):
                    keys.append(key)
                    if len(keys) >= batch:
                        yield from self._scan_batch(keys)
                        keys = []
            except RedisError as e:
                failed.append(f"{name}: {e}")
            if keys:
                yield from self._scan_batch(keys)
        if failed:
            raise BackendUnavailable(f"redis scan incomplete: {'; '.join(failed)}",
                                     field="redis")

    def _scan_batch(self, keys: list[bytes]) -> Iterator[tuple[PageId, RemoteMeta]]:
        pids = [self.parse_key(k) for k in keys]
        ours = [p for p in pids if p is not None]
        for pid, got in zip(ours, self.fetch(ours, blobs=False), strict=True):
            if isinstance(got, Found):
                yield pid, got.meta


def _parse_meta(vals: Sequence[object]) -> RemoteMeta | None:
    if len(vals) != len(_META_FIELDS) or not all(isinstance(v, bytes) for v in vals):
        return None
    raw = [v for v in vals if isinstance(v, bytes)]
    try:
        prec, nbytes, stored, chain = (int(v) for v in raw[:4])
        token = raw[4].decode("ascii")
        return RemoteMeta(Precision(prec), nbytes, stored, chain, token)
    except (ValueError, UnicodeDecodeError):
        return None
