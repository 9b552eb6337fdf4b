"""The daemon side of the policy service: a Policy that never blocks the data path.

``record()`` only appends to a bounded queue (a full queue drops the event and counts it); a
sender thread ships the queue in batches over the streamed ``ReportAccesses``. ``score()`` asks
the service with a short timeout. Whenever the service is slow or down, decisions fall back to
LRU (``status()`` says so, with the reason), events sent in vain are counted as dropped, and
the client retries after ``retry_s``; when the service answers again it is used again.
``admit()`` runs on the put path, so it never calls out: it uses the verdicts of the latest
``Score`` replies and admits pages it has none for.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence

import grpc

from kvtier.config import PolicyConfig, TlsConfig
from kvtier.policy.registry import make_local_policy, policy_names
from kvtier.store.policy import AccessEvent, LRUPolicy, PageMeta, Policy, PolicyStatus
from kvtier.transport.policy.convert import access_to_msg, meta_to_msg
from kvtier.transport.tls import policy_channel_credentials
from kvtier.types import PageId
from kvtier_proto.v1 import policy_pb2, policy_pb2_grpc

log = logging.getLogger(__name__)

_CHANNEL_OPTIONS = [
    # Reconnect quickly once the service is back, instead of gRPC's backoff up to 2 minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class RemotePolicy(Policy):
    """Client of a ``kvtier policy`` service at ``address`` (host:port)."""

    name = "remote"

    def __init__(self, address: str, *, configured: str = "learned", timeout_s: float = 0.05,
                 queue_size: int = 65536, batch: int = 1024, retry_s: float = 0.5,
                 admit_cache: int = 65536, token: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        self.address = address
        self.configured = configured
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.batch = batch
        self._channel = (grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
                         if credentials is None else
                         grpc.secure_channel(address, credentials, options=_CHANNEL_OPTIONS))
        self._stub = policy_pb2_grpc.PolicyServiceStub(self._channel)
        if token:  # the service's shared secret, sent on every call (kvtier.transport.auth)
            metadata = (("authorization", f"Bearer {token}"),)
            for name in ("ReportAccesses", "Score", "Status"):
                setattr(self._stub, name,
                        functools.partial(getattr(self._stub, name), metadata=metadata))
        self._queue: queue.Queue[AccessEvent] = queue.Queue(maxsize=queue_size)
        self._fallback = LRUPolicy()
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._reason = "not contacted yet"
        self._admit: OrderedDict[PageId, bool] = OrderedDict()
        self._admit_cap = admit_cache
        self.dropped = 0
        self._dropped_unsent = 0
        self.sent = 0
        self.fallback_calls = 0
        self._stop = threading.Event()
        self._sender = threading.Thread(target=self._send_loop, name="kvtier-policy-sender",
                                        daemon=True)
        self._sender.start()

    # -- health -------------------------------------------------------------------------------

    @property
    def down(self) -> bool:
        return time.monotonic() < self._down_until

    def _failed(self, what: str, err: grpc.RpcError) -> None:
        code = err.code() if isinstance(err, grpc.Call) else None
        with self._lock:
            if not self.down:
                log.warning("policy service %s: %s failed (%s); using LRU", self.address, what,
                            code.name if code else err)
            self._reason = f"{what} failed: {code.name if code else 'error'}"
            self._down_until = time.monotonic() + self.retry_s

    def _ok(self) -> None:
        with self._lock:
            if self._down_until:
                log.info("policy service %s is back", self.address)
            self._down_until = 0.0
            self._reason = ""

    # -- events -------------------------------------------------------------------------------

    def record(self, events: Sequence[AccessEvent]) -> None:
        for ev in events:
            try:
                self._queue.put_nowait(ev)
            except queue.Full:
                with self._lock:
                    self.dropped += 1
                    self._dropped_unsent += 1

    def _take(self) -> list[AccessEvent]:
        try:
            first = self._queue.get(timeout=0.05)
        except queue.Empty:
            return []
        out = [first]
        while len(out) < self.batch:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return out

    def _send_loop(self) -> None:
        while not self._stop.is_set():
            if self.down:
                self._stop.wait(min(0.05, self.retry_s))
                if self.down:
                    continue
            events = self._take()
            if not events:
                continue
            with self._lock:
                dropped, self._dropped_unsent = self._dropped_unsent, 0
            msg = policy_pb2.AccessBatch(accesses=[access_to_msg(e) for e in events],
                                         dropped=dropped)
            try:
                self._stub.ReportAccesses(iter([msg]), timeout=max(self.timeout_s * 20, 1.0))
                self.sent += len(events)
                self._ok()
            except grpc.RpcError as e:
                with self._lock:
                    self.dropped += len(events)
                    self._dropped_unsent += len(events) + dropped
                self._failed("ReportAccesses", e)

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until the queue is empty (for tests and shutdown); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while not self._queue.empty() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        return self._queue.empty()

    # -- decisions ----------------------------------------------------------------------------

    def score(self, pages: Sequence[PageMeta]) -> list[float]:
        if not pages:
            return []
        if self.down:
            self.fallback_calls += 1
            return self._fallback.score(pages)
        try:
            reply = self._stub.Score(
                policy_pb2.ScoreRequest(pages=[meta_to_msg(m) for m in pages]),
                timeout=self.timeout_s)
        except grpc.RpcError as e:
            self._failed("Score", e)
            self.fallback_calls += 1
            return self._fallback.score(pages)
        self._ok()
        with self._lock:
            for m, ok in zip(pages, reply.admit, strict=False):
                self._admit[m.page] = bool(ok)
                self._admit.move_to_end(m.page)
            while len(self._admit) > self._admit_cap:
                self._admit.popitem(last=False)
        return list(reply.scores)

    def admit(self, page: PageMeta, tier: str) -> bool:
        if self.down:
            return True
        with self._lock:
            return self._admit.get(page.page, True)

    def status(self) -> PolicyStatus:
        down = self.down
        detail = (f"remote {self.address}: sent={self.sent} dropped={self.dropped} "
                  f"queued={self._queue.qsize()}")
        if down:
            return PolicyStatus(self.configured, "lru", True, f"{detail}; {self._reason}",
                                events_dropped=self.dropped)
        return PolicyStatus(self.configured, self.configured, False, detail,
                            events_dropped=self.dropped)

    def close(self) -> None:
        self._stop.set()
        self._sender.join(timeout=2.0)
        self._channel.close()


def make_policy(config: PolicyConfig, tls: TlsConfig | None = None) -> Policy:
    """The live policy for ``config``: embedded (:func:`~kvtier.policy.registry.make_local_policy`),
    or a :class:`RemotePolicy` of the service at ``config.address``.

    InvalidArgument naming the known policies for an unknown name. With ``tls`` enabled the
    service is called over TLS (:func:`kvtier.transport.tls.policy_channel_credentials`).
    """
    if config.name not in policy_names():
        make_local_policy(config)  # raises with the list of names
    if config.address:
        return RemotePolicy(config.address, configured=config.name,
                            timeout_s=config.timeout_s, queue_size=config.queue_size,
                            token=config.token,
                            credentials=policy_channel_credentials(tls) if tls else None)
    return make_local_policy(config)
