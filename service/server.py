"""The shard server: the `datastore.v1.Datastore` service over one embedded Datastore,
with health checking and server reflection registered (grpcurl, Kubernetes probes).

Servicer methods only convert and delegate; one interceptor turns DatastoreError into
statuses with details, so no method handles errors itself. Outside it, the guard
(service/limits.py) refuses malformed payloads, caps deadlines and stream sizes and applies
per-key quotas before any work is done.

Health names: "" and "datastore.v1.Datastore" report readiness (a router: NOT_SERVING while
some shard server has no live replica); "liveness" reports SERVING for as long as the
process answers, for liveness probes that must not restart a router whose shards are down.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from datastore.errors import DatastoreError
from datastore.store import Datastore

if TYPE_CHECKING:
    from service.router import Router
from service.auth import AuthInterceptor
from service.interceptors import wrap_handler
from service.limits import GuardInterceptor, ServiceLimits
from service.metrics import MetricsInterceptor
from service.pb import datastore_pb2 as pb
from service.pb import datastore_pb2_grpc as pb_grpc
from service.servicer import DatastoreServicer
from service.status import to_status

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Datastore"].full_name
#: Health service name that reports SERVING for as long as the process answers at all
#: (a liveness probe); "" and SERVICE_NAME report readiness (a router: its shards' health).
LIVENESS_NAME = "liveness"


@dataclass(frozen=True)
class ServerConfig:
    max_workers: int = 16
    max_message_bytes: int = 64 * 1024 * 1024
    grace_seconds: float = 5.0
    #: Count and time RPCs for the Prometheus exporter (service/metrics.py).
    metrics: bool = False
    #: PEM files: serve TLS instead of plaintext.
    tls_cert: str | None = None
    tls_key: str | None = None
    #: Calls in progress or queued beyond this are refused at once with RESOURCE_EXHAUSTED
    #: (None: grpc queues without bound behind the worker threads).
    max_concurrent_rpcs: int | None = None
    #: Deadlines, stream size and per-key quotas (service/limits.py).
    limits: ServiceLimits = field(default_factory=ServiceLimits)


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps DatastoreError to its status with details; anything else to INTERNAL (logged)."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None

        def wrap(behavior: Callable, _streaming: bool) -> Callable:
            def run(request_or_iterator: Any, context: grpc.ServicerContext):
                try:
                    return behavior(request_or_iterator, context)
                except DatastoreError as e:
                    context.abort_with_status(to_status(e))
                except grpc.RpcError:
                    raise
                except Exception:
                    if context.code() is not None:  # already aborted inside the handler
                        raise
                    log.exception("internal error in %s", handler_call_details.method)
                    context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")
            return run

        return wrap_handler(handler, wrap)


def _authenticator(store) -> Callable[[str | None], object] | None:
    """Keys are enforced from the moment the datastore holds one (checked per call, so a
    key created while serving takes effect at once). A router has no keys of its own: it
    forwards the caller's key and its shard servers decide."""
    control = getattr(store, "control", None)
    if control is None:
        return None
    return lambda key: control.authenticate(key) if control.has_keys() else None


def create_server(store: Datastore | Router, address: str = "127.0.0.1:0",
                  config: ServerConfig = ServerConfig()) -> tuple[grpc.Server, int]:
    """A started server bound to `address` (port 0 picks a free one); returns (server, port)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="grpc"),
        interceptors=([MetricsInterceptor()] if config.metrics else [])
        + [GuardInterceptor(config.limits), ErrorInterceptor(), AuthInterceptor(_authenticator(store))],
        options=[("grpc.max_receive_message_length", config.max_message_bytes),
                 ("grpc.max_send_message_length", config.max_message_bytes)],
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
    )
    pb_grpc.add_DatastoreServicer_to_server(DatastoreServicer(store), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME, LIVENESS_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    if config.tls_cert:
        with open(config.tls_cert, "rb") as c, open(config.tls_key or "", "rb") as k:
            creds = grpc.ssl_server_credentials([(k.read(), c.read())])
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind {address}")
    server.start()
    server.health_servicer = health_servicer  # type: ignore[attr-defined]  # for graceful shutdown
    watch = getattr(store, "on_health_change", None)
    if watch is not None:  # a router is healthy while every shard server has a live replica
        watch(lambda ok: set_serving(server, ok))
    return server, port


def set_serving(server: grpc.Server, serving: bool) -> None:
    """Report SERVING or NOT_SERVING on the readiness names of the health service (what
    balancers and readiness probes read); LIVENESS_NAME stays SERVING."""
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        server.health_servicer.set(name, status)  # type: ignore[attr-defined]


def stop_server(server: grpc.Server, config: ServerConfig = ServerConfig()) -> None:
    """Report NOT_SERVING first (so balancers drain), then stop with a grace period."""
    hs = getattr(server, "health_servicer", None)
    if hs is not None:
        hs.enter_graceful_shutdown()
    server.stop(config.grace_seconds).wait()
