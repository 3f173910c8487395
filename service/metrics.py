"""Prometheus metrics on a separate HTTP port, for both roles (shard server and router).

Requests are counted and timed per RPC and status code by an interceptor; the router also
times each call to a shard server; passage counts come from Stats at scrape time.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

from service.interceptors import wrap_handler

REGISTRY = CollectorRegistry(auto_describe=True)
REQUESTS = Counter("datastore_requests_total", "RPCs handled", ["method", "code"], registry=REGISTRY)
LATENCY = Histogram("datastore_request_seconds", "RPC latency", ["method"], registry=REGISTRY,
                    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10))
SHARD_LATENCY = Histogram("datastore_shard_call_seconds", "Router calls to shard servers",
                          ["server", "method"], registry=REGISTRY)
SHARD_ERRORS = Counter("datastore_shard_errors_total", "Failed router calls to shard servers",
                       ["server", "method", "code"], registry=REGISTRY)
GUARD_REFUSALS = Counter("datastore_guard_refusals_total",
                         "Calls refused before any work: quotas, stream limits, malformed payloads, deadlines",
                         ["reason"], registry=REGISTRY)


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts and times every unary and client-streaming RPC."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]

        def wrap(behavior: Callable, _streaming: bool) -> Callable:
            def run(request_or_iterator, context):
                t = time.perf_counter()
                code = "OK"
                try:
                    return behavior(request_or_iterator, context)
                except Exception:
                    code = (context.code() or grpc.StatusCode.UNKNOWN).name
                    raise
                finally:
                    LATENCY.labels(method).observe(time.perf_counter() - t)
                    REQUESTS.labels(method, code).inc()
            return run

        return wrap_handler(handler, wrap)


class _StatsCollector:
    """Passages and index memory per shard, read from the store's stats() at scrape time."""

    def __init__(self, stats: Callable) -> None:
        self._stats = stats

    def collect(self):
        passages = GaugeMetricFamily("datastore_passages", "Passages per shard", labels=["shard"])
        memory = GaugeMetricFamily("datastore_index_memory_bytes", "Index RAM per shard", labels=["shard"])
        try:
            st = self._stats()
        except Exception:  # noqa: BLE001  # a scrape must not fail because a shard is down
            return
        for s in st.shards:
            passages.add_metric([str(s.shard_id)], s.passages)
            memory.add_metric([str(s.shard_id)], s.index_memory_bytes)
        yield passages
        yield memory


def serve_metrics(port: int, stats: Callable) -> int:
    """Start the HTTP exporter on `port` (0: a free one); returns the port."""
    REGISTRY.register(_StatsCollector(stats))
    server, _ = start_http_server(port, addr="127.0.0.1" if port == 0 else "0.0.0.0", registry=REGISTRY)
    return server.server_port
