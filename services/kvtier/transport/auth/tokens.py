"""Tenant tokens: the tokens file, and the registry the daemon checks every call against.

A token is a random string (``kvt_`` + 43 URL-safe characters, 256 bits) handed to one tenant.
It grants a set of namespaces, read-write or read-only. The tokens file stores only a hash of
each token, so reading the file does not reveal a token::

    {"version": 1,
     "tokens": [{"id": "3f9a1c0d",                  # 8 hex digits, names the token in list/revoke
                 "hash": "sha256:<64 hex digits>",  # SHA-256 of the token's UTF-8 bytes
                 "namespaces": ["tenant-a"],
                 "read_only": false,
                 "created": "2026-01-01T00:00:00Z"}]}

SHA-256 without salt or stretching is enough: the tokens are random with 256 bits of entropy,
so there is no dictionary to run against a stolen hash.

:class:`TokenFile` edits the file (``kvtier token create/list/revoke``): every change is written
to a temporary file of mode 0600 beside it and renamed over it, under an exclusive lock on
``FILE.lock``, so a reader never sees half a file and two editors never lose each other's change.

:class:`TokenRegistry` is the daemon's view. :meth:`TokenRegistry.grant` hashes the presented
token and looks it up; at most every ``check_interval_s`` one caller also ``stat``s the file and
reloads it when it changed (mtime, size or inode), so a revoked token stops working within that
interval and no restart is needed; :meth:`TokenRegistry.reload` (SIGHUP) does it at once. A file
that disappears or stops parsing while the daemon runs denies every token (fail closed) and is
logged until it is fixed; at start it is a :class:`~kvtier.errors.ConfigError`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kvtier.errors import ConfigError, InvalidArgument
from kvtier.types import namespace_problem

log = logging.getLogger(__name__)

TOKEN_PREFIX = "kvt_"
_ID = re.compile(r"^[0-9a-f]{8}$")
_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")
FILE_VERSION = 1


def hash_token(token: str) -> str:
    """The stored form of ``token``: ``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def new_token() -> str:
    """A fresh random token (256 bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class TokenEntry:
    """One line of the tokens file."""

    id: str
    hash: str
    namespaces: tuple[str, ...]
    read_only: bool
    created: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "hash": self.hash, "namespaces": list(self.namespaces),
                "read_only": self.read_only, "created": self.created}

    @staticmethod
    def from_json(raw: Any, where: str) -> TokenEntry:
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: each token must be a JSON object")
        unknown = set(raw) - {"id", "hash", "namespaces", "read_only", "created"}
        if unknown:
            raise ConfigError(f"{where}: unknown fields {sorted(unknown)}")
        tid, digest, namespaces = raw.get("id"), raw.get("hash"), raw.get("namespaces")
        read_only, created = raw.get("read_only", False), raw.get("created", "")
        if not isinstance(tid, str) or not _ID.match(tid):
            raise ConfigError(f"{where}: id must be 8 hex digits, got {tid!r}")
        if not isinstance(digest, str) or not _HASH.match(digest):
            raise ConfigError(f"{where}: hash must be 'sha256:<64 hex digits>'")
        if not isinstance(namespaces, list) or not namespaces:
            raise ConfigError(f"{where}: namespaces must be a non-empty list")
        for ns in namespaces:
            problem = namespace_problem(ns)
            if problem is not None:
                raise ConfigError(f"{where}: {problem}")
        if not isinstance(read_only, bool):
            raise ConfigError(f"{where}: read_only must be true or false")
        if not isinstance(created, str):
            raise ConfigError(f"{where}: created must be a string")
        return TokenEntry(tid, digest, tuple(namespaces), read_only, created)


@dataclass(frozen=True, slots=True)
class Grant:
    """What a valid token may do: its id (for logs), namespaces, and whether it may write."""

    token_id: str
    namespaces: frozenset[str]
    read_only: bool

    def allows(self, namespace: str, write: bool) -> bool:
        return namespace in self.namespaces and not (write and self.read_only)


def parse_tokens(text: str, where: str) -> list[TokenEntry]:
    """The entries of a tokens file's text; ConfigError naming what is wrong."""
    try:
        data = json.loads(text) if text.strip() else {"version": FILE_VERSION, "tokens": []}
    except json.JSONDecodeError as e:
        raise ConfigError(f"tokens file {where} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("tokens"), list):
        raise ConfigError(f"tokens file {where} must hold {{\"version\": 1, \"tokens\": [...]}}")
    if data.get("version", FILE_VERSION) != FILE_VERSION:
        raise ConfigError(f"tokens file {where}: unsupported version {data.get('version')!r}")
    entries = [TokenEntry.from_json(raw, f"tokens file {where}, token {i}")
               for i, raw in enumerate(data["tokens"])]
    ids = [e.id for e in entries]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"tokens file {where}: token ids must be unique")
    return entries


class TokenFile:
    """Create, list and revoke tokens in one file (the ``kvtier token`` commands)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def entries(self) -> list[TokenEntry]:
        """The file's tokens; an absent file holds none."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        except OSError as e:
            raise ConfigError(f"cannot read tokens file {self.path}: {e.strerror}") from None
        return parse_tokens(text, str(self.path))

    def create(self, namespaces: Sequence[str], read_only: bool = False) -> tuple[str, TokenEntry]:
        """A new token for ``namespaces``; returns the token (shown once) and its entry."""
        if not namespaces:
            raise InvalidArgument("a token needs at least one namespace", field="namespace")
        for ns in namespaces:
            problem = namespace_problem(ns)
            if problem is not None:
                raise InvalidArgument(problem, field="namespace")
        clean = tuple(dict.fromkeys(namespaces))
        token = new_token()
        created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        with self._locked():
            entries = self.entries()
            taken = {e.id for e in entries}
            tid = secrets.token_hex(4)
            while tid in taken:
                tid = secrets.token_hex(4)
            entry = TokenEntry(tid, hash_token(token), clean, read_only, created)
            self._write([*entries, entry])
        return token, entry

    def revoke(self, which: str) -> TokenEntry:
        """Remove the token named by its id or by the token itself; NotFound-like
        InvalidArgument if none matches."""
        digest = hash_token(which)
        with self._locked():
            entries = self.entries()
            hit = [e for e in entries if e.id == which or e.hash == digest]
            if not hit:
                raise InvalidArgument(f"no token {which!r} in {self.path}", field="token")
            self._write([e for e in entries if e is not hit[0]])
        return hit[0]

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the lock

    def _write(self, entries: Sequence[TokenEntry]) -> None:
        body = json.dumps({"version": FILE_VERSION, "tokens": [e.to_json() for e in entries]},
                          indent=2) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


_Stamp = tuple[int, int, int]  # mtime_ns, size, inode
_SEEN_MAX = 4096  # valid tokens remembered unhashed between reloads


class TokenRegistry:
    """The daemon's tokens, reloaded from the file when it changes. Thread-safe.

    The per-call cost is one dict lookup (a token seen before) or one SHA-256 of the token and
    a lookup; the file is looked at (one ``stat``) by at most one caller every
    ``check_interval_s``. Only valid tokens are remembered, so bogus tokens cannot fill it.
    """

    def __init__(self, path: str | Path, check_interval_s: float = 1.0) -> None:
        self.path = Path(path)
        self.check_interval_s = check_interval_s
        self._lock = threading.Lock()
        self._grants: dict[str, Grant] = {}
        self._seen: dict[str, Grant] = {}
        self._stamp: _Stamp | None = None
        self._next_check = 0.0
        self._broken = False
        try:
            stamp = self._stat()
            self._grants = self._load()
        except OSError as e:
            hint = (" (create it with 'kvtier token create --tokens-file FILE --namespace NS')"
                    if isinstance(e, FileNotFoundError) else "")
            raise ConfigError(f"cannot read tokens file {self.path}: {e.strerror}{hint}",
                              field="auth.tokens_file") from None
        self._stamp = stamp
        self._next_check = time.monotonic() + check_interval_s

    def __len__(self) -> int:
        return len(self._grants)

    def grant(self, token: str) -> Grant | None:
        """The grant of ``token``, or None for an unknown (or revoked) token."""
        if time.monotonic() >= self._next_check:
            self._maybe_reload()
        seen = self._seen  # tokens already hashed and found; replaced whole on every reload
        grant = seen.get(token)
        if grant is None:
            grant = self._grants.get(hash_token(token))
            if grant is not None and len(seen) < _SEEN_MAX:
                seen[token] = grant
        return grant

    def reload(self) -> bool:
        """Re-read the file now (SIGHUP); False (and every token denied) if it is unusable."""
        with self._lock:
            return self._reload_locked(force=True)

    def _maybe_reload(self) -> None:
        if not self._lock.acquire(blocking=False):
            return  # another caller is checking; this one uses the tokens as they are
        try:
            if time.monotonic() >= self._next_check:
                self._reload_locked(force=False)
        finally:
            self._lock.release()

    def _reload_locked(self, force: bool) -> bool:
        self._next_check = time.monotonic() + self.check_interval_s
        try:
            stamp = self._stat()
            if not force and stamp == self._stamp and not self._broken:
                return True
            grants = self._load()
        except (OSError, ConfigError) as e:
            reason = e.strerror if isinstance(e, OSError) else str(e)
            log.error("tokens file %s is unusable (%s): denying every token until it is fixed",
                      self.path, reason)
            self._grants, self._stamp, self._broken = {}, None, True
            self._seen = {}
            return False
        if self._broken or grants.keys() != self._grants.keys():
            log.info("tokens file %s loaded: %d tokens", self.path, len(grants))
        self._grants, self._stamp, self._broken = grants, stamp, False
        self._seen = {}
        return True

    def _stat(self) -> _Stamp:
        st = os.stat(self.path)
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if st.st_mode & 0o022 and stamp != self._stamp:
            log.warning("tokens file %s is writable by others (mode %o): whoever can write it "
                        "can grant themselves any namespace", self.path, st.st_mode & 0o777)
        return stamp

    def _load(self) -> dict[str, Grant]:
        entries = parse_tokens(self.path.read_text(), str(self.path))
        return {e.hash: Grant(e.id, frozenset(e.namespaces), e.read_only) for e in entries}
