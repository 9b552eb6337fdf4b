"""The policy service over real gRPC and HTTP, and the daemon-side RemotePolicy client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator

import grpc
import pytest

from kvtier.policy.learned.policy import LearnedPolicy
from kvtier.procs.redis import free_port
from kvtier.store.policy import AccessKind, LRUPolicy
from kvtier.transport.policy.client import RemotePolicy
from kvtier.transport.policy.service import make_metrics_server, make_policy_server
from kvtier_proto.v1 import policy_pb2, policy_pb2_grpc

from .helpers import event, meta


def _until(cond: Callable[[], bool], timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


@pytest.fixture()
def service() -> Iterator[tuple[str, int, LearnedPolicy]]:
    policy = LearnedPolicy(horizon=64, min_labels=50, device="cpu")
    server, port, servicer = make_policy_server(policy, "127.0.0.1", 0)
    httpd, http_port = make_metrics_server(servicer, "127.0.0.1", 0)
    server.start()
    web = threading.Thread(target=httpd.serve_forever, daemon=True)
    web.start()
    try:
        yield f"127.0.0.1:{port}", http_port, policy
    finally:
        server.stop(0)
        httpd.shutdown()


def test_reports_scores_status_and_metrics(service: tuple[str, int, LearnedPolicy]) -> None:
    address, http_port, policy = service
    remote = RemotePolicy(address, timeout_s=2.0)
    try:
        evs = [event(f"p{i % 7}", i + 1, AccessKind.GET, chain=i % 7) for i in range(300)]
        remote.record(evs)
        assert remote.flush()
        assert _until(lambda: policy.events == 300)
        assert _until(lambda: "sent=300" in remote.status().detail)
        cands = [meta("p1", 299, 40), meta("p2", 300, 40)]
        assert remote.score(cands) == policy.score(cands)
        st = remote.status()
        assert not st.fallback_active and st.active == "learned" and "sent=300" in st.detail
        body = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics",
                                      timeout=5).read().decode()
        assert "kvtier_policy_events_total 300.0" in body
        assert "kvtier_policy_events_dropped_total 0.0" in body
        assert "kvtier_policy_fallback_active 0.0" in body
        labelled = policy.model.predictor.labelled
        assert labelled > 0 and f"kvtier_policy_labelled_samples_total {labelled}.0" in body
        with grpc.insecure_channel(address) as ch:
            stub = policy_pb2_grpc.PolicyServiceStub(ch)
            reply = stub.Status(policy_pb2.PolicyStatusRequest(), timeout=5)
            assert (reply.name, reply.events) == ("learned", 300)
            with pytest.raises(grpc.RpcError) as err:
                stub.Score(policy_pb2.ScoreRequest(pages=[policy_pb2.PolicyPage(key=b"x")]),
                           timeout=5)
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "namespace" in (err.value.details() or "")
            with pytest.raises(grpc.RpcError) as err:
                stub.ReportAccesses(iter([policy_pb2.AccessBatch(accesses=[
                    policy_pb2.PolicyAccess(namespace="t", key=b"k", kind="steal")])]), timeout=5)
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "kind" in (err.value.details() or "")
    finally:
        remote.close()


def test_a_full_queue_drops_and_counts_without_blocking() -> None:
    # Nothing listens here: the sender cannot drain, so a small queue fills up.
    remote = RemotePolicy(f"127.0.0.1:{free_port()}", timeout_s=0.05, queue_size=16,
                          retry_s=5.0)
    try:
        t0 = time.monotonic()
        remote.record([event(f"p{i}", i) for i in range(1000)])
        # Blocking would cost timeout_s per event (50 s); the bound leaves room for a loaded box.
        assert time.monotonic() - t0 < 5.0
        assert remote.dropped >= 1000 - 16
        cands = [meta("a", 5), meta("b", 3)]
        assert remote.score(cands) == LRUPolicy().score(cands)
        assert remote.status().fallback_active
        assert remote.admit(cands[0], "hot") is True
    finally:
        remote.close()


def _start_service(grpc_port: int) -> subprocess.Popen[str]:
    env = dict(os.environ, KVTIER_POLICY_HTTP_PORT="0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvtier.cli", "policy", "--grpc-port", str(grpc_port),
         "--http-port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "serving gRPC" in line, line
    return proc


def test_falls_back_when_the_service_is_killed_and_recovers_when_it_returns() -> None:
    port = free_port()
    proc = _start_service(port)
    remote = RemotePolicy(f"127.0.0.1:{port}", timeout_s=1.0, retry_s=0.2)
    cands = [meta("a", 5), meta("b", 3)]
    try:
        remote.record([event("a", 1), event("b", 2)])
        assert remote.flush()
        remote.score(cands)
        assert not remote.status().fallback_active
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert remote.score(cands) == [5.0, 3.0]  # LRU: last access sequence
        st = remote.status()
        assert st.fallback_active and st.active == "lru" and "failed" in st.detail
        remote.record([event("c", 3)])
        assert _until(lambda: remote.dropped >= 1, 10)
        proc = _start_service(port)

        def back() -> bool:
            remote.score(cands)
            return not remote.status().fallback_active

        assert _until(back, 20), remote.status().detail
        remote.record([event("d", 4)])
        assert _until(lambda: "sent=3" in remote.status().detail, 10), remote.status().detail
    finally:
        remote.close()
        proc.kill()
        proc.wait(timeout=10)


def test_serves_grpc_health() -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server, port, _ = make_policy_server(LearnedPolicy(device="cpu"), "127.0.0.1", 0)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            for name in ("", "kvtier.v1.PolicyService"):
                reply = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(0)
