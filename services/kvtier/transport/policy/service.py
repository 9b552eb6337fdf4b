"""The policy service: gRPC ``kvtier.v1.PolicyService`` and Prometheus ``/metrics``.

It hosts one live :class:`~kvtier.store.policy.Policy` (the learned predictor by default) for
daemons that run it out of process; the daemon side is :mod:`kvtier.transport.policy.client`.
Factories return ``(server, port)`` so tests bind port 0. Errors map through the one table in
:mod:`kvtier.errors` by the cache service's own interceptor
(:class:`~kvtier.transport.interceptor.ErrorInterceptor`); anything unexpected is INTERNAL with a
logged traceback.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kvtier.config import TlsConfig
from kvtier.policy.learned.policy import LearnedPolicy
from kvtier.store.policy import Policy
from kvtier.transport.auth.guard import SharedSecretGuard
from kvtier.transport.bind import bind_port
from kvtier.transport.interceptor import ErrorInterceptor
from kvtier.transport.policy.convert import access_from_msg, meta_from_msg
from kvtier.transport.stats import RpcStats
from kvtier.transport.tls import server_credentials, ssl_server_context
from kvtier_proto.v1 import policy_pb2, policy_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name


@dataclass(frozen=True, slots=True)
class ServiceFigures:
    """What /metrics and Status report, read at scrape time."""

    events: int
    events_dropped: int
    labelled: int
    steps: int
    loss: float
    accuracy: float
    train_seconds: float
    fallback_active: bool


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):  # type: ignore[misc]
    """Validate, convert, call the policy, convert back. One lock serialises the policy."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._lock = threading.Lock()
        self.events = 0
        self.events_dropped = 0

    def ReportAccesses(self, request_iterator: Iterator[policy_pb2.AccessBatch],
                       context: grpc.ServicerContext) -> policy_pb2.ReportAck:
        accepted = 0
        for batch in request_iterator:
            events = [access_from_msg(m) for m in batch.accesses]
            with self._lock:
                self.policy.record(events)
                self.events += len(events)
                self.events_dropped += batch.dropped
            accepted += len(events)
        return policy_pb2.ReportAck(accepted=accepted)

    def Score(self, request: policy_pb2.ScoreRequest,
              context: grpc.ServicerContext) -> policy_pb2.ScoreReply:
        metas = [meta_from_msg(m) for m in request.pages]
        with self._lock:
            scores = self.policy.score(metas)
            admit = [self.policy.admit(m, request.tier or m.tier) for m in metas]
        return policy_pb2.ScoreReply(scores=scores, admit=admit)

    def Status(self, request: policy_pb2.PolicyStatusRequest,
               context: grpc.ServicerContext) -> policy_pb2.PolicyStatusReply:
        st = self.policy.status()
        fig = self.figures()
        return policy_pb2.PolicyStatusReply(
            name=st.name, active=st.active, fallback_active=st.fallback_active,
            detail=st.detail, events=fig.events, events_dropped=fig.events_dropped,
            labelled=fig.labelled, loss=fig.loss, accuracy=fig.accuracy,
        )

    def figures(self) -> ServiceFigures:
        labelled = steps = 0
        loss = accuracy = math.nan
        train_s = 0.0
        if isinstance(self.policy, LearnedPolicy):
            st = self.policy.model.predictor.stats()
            labelled, steps, loss, accuracy, train_s = (st.labelled, st.steps, st.loss,
                                                        st.accuracy, st.train_seconds)
        return ServiceFigures(self.events, self.events_dropped, labelled, steps, loss,
                              accuracy, train_s, self.policy.status().fallback_active)


def make_policy_server(policy: Policy, host: str = "127.0.0.1", port: int = 0,
                       workers: int = 4, token: str | None = None,
                       tls: TlsConfig | None = None,
                       ) -> tuple[grpc.Server, int, PolicyServicer]:
    """A gRPC server (not yet started) hosting ``policy``, plus ``grpc.health.v1`` (SERVING
    for "" and ``kvtier.v1.PolicyService``); port 0 picks a free port. With ``token`` every
    PolicyService call needs ``authorization: Bearer <token>`` (UNAUTHENTICATED otherwise);
    health stays open. With ``tls`` enabled the port speaks TLS only (and requires client
    certificates with ``client_ca_file``)."""
    guard = SharedSecretGuard(token, (SERVICE_NAME,)) if token else None
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers,
                                                    thread_name_prefix="kvtier-policy"),
                         interceptors=[ErrorInterceptor(RpcStats(), guard)])
    servicer = PolicyServicer(policy)
    policy_pb2_grpc.add_PolicyServiceServicer_to_server(servicer, server)
    checker = health.HealthServicer()
    for name in ("", SERVICE_NAME):
        checker.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    creds = server_credentials(tls) if tls is not None else None
    return server, bind_port(server, host, port, "policy_grpc_port", creds), servicer


class _Collector(Collector):
    def __init__(self, servicer: PolicyServicer) -> None:
        self.servicer = servicer

    def collect(self) -> Iterable[Any]:
        f = self.servicer.figures()
        yield GaugeMetricFamily("kvtier_policy_loss", "EMA of the predictor's training loss",
                                value=f.loss)
        yield CounterMetricFamily("kvtier_policy_labelled_samples",
                                  "Samples labelled by later accesses", value=f.labelled)
        yield CounterMetricFamily("kvtier_policy_train_steps", "AdamW steps", value=f.steps)
        yield CounterMetricFamily("kvtier_policy_train_seconds", "Time spent training",
                                  value=f.train_seconds)
        yield GaugeMetricFamily("kvtier_policy_online_accuracy",
                                "Share of predictions right about reuse, judged online",
                                value=f.accuracy)
        yield GaugeMetricFamily("kvtier_policy_fallback_active",
                                "1 while the policy decides by LRU", value=float(f.fallback_active))
        yield CounterMetricFamily("kvtier_policy_events", "Access events received",
                                  value=f.events)
        yield CounterMetricFamily("kvtier_policy_events_dropped",
                                  "Access events senders dropped (full queue, service down)",
                                  value=f.events_dropped)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("metrics: " + format, *args)


def make_metrics_server(servicer: PolicyServicer, host: str = "127.0.0.1",
                        port: int = 0, tls: TlsConfig | None = None) -> tuple[WSGIServer, int]:
    """``/metrics`` over HTTP (HTTPS with ``tls`` enabled) from a private registry; serve it
    with ``serve_forever``."""
    registry = CollectorRegistry()
    registry.register(_Collector(servicer))
    app = make_wsgi_app(registry)
    httpd = make_server(host, port, app, handler_class=_QuietHandler)
    context = ssl_server_context(tls) if tls is not None else None
    if context is not None:
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    return httpd, int(httpd.server_port)
