"""The shard server: the `datastore.v1.Datastore` service over one embedded Datastore,
with health checking and server reflection registered (grpcurl, Kubernetes probes).

Servicer methods only convert and delegate; one interceptor turns DatastoreError into
statuses with details, so no method handles errors itself.
"""

from __future__ import annotations

import logging
from concurrent import futures
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from datastore.errors import DatastoreError, InvalidArgument, ResourceExhausted
from datastore.store import Datastore

if TYPE_CHECKING:
    from service.router import Router
from service import convert
from service.pb import datastore_pb2 as pb
from service.pb import datastore_pb2_grpc as pb_grpc
from service.auth import AuthInterceptor, effective_tenant, require_admin
from service.metrics import MetricsInterceptor
from service.status import to_status

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Datastore"].full_name


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


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps DatastoreError to its status with details; anything else to INTERNAL (logged)."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None

        def wrap(behavior: Callable) -> Callable:
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

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary), handler.request_deserializer,
                                                       handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary), handler.request_deserializer,
                                                        handler.response_serializer)
        return handler


class DatastoreServicer(pb_grpc.DatastoreServicer):
    def __init__(self, store: "Datastore | Router") -> None:
        self.store = store  # the embedded Datastore on a shard server, the Router on a router

    def Search(self, request: pb.SearchRequest, context) -> pb.SearchResponse:
        hits, missing = self.store.search_with_coverage(
            convert.queries_from_pb(request.queries), int(request.k),
            tenant=effective_tenant(request.tenant if request.HasField("tenant") else None),
            metadata_filter=dict(request.metadata_filter) or None,
            params=convert.params_from_pb(request.params), include_text=request.include_text,
            timeout=context.time_remaining())
        response = convert.hits_to_pb(hits, request.include_text)
        response.missing_shards.extend(missing)
        return response

    def GetPassages(self, request: pb.GetPassagesRequest, context) -> pb.GetPassagesResponse:
        passages = self.store.get_passages(
            list(request.ids), tenant=effective_tenant(request.tenant if request.HasField("tenant") else None))
        return pb.GetPassagesResponse(passages=[convert.passage_to_pb(p) for p in passages])

    def Upsert(self, request_iterator, context) -> pb.UpsertResponse:
        # All items are read and checked before anything is written: a bad item changes nothing.
        require_admin("Upsert")
        passages, vectors = [], []
        for n, item in enumerate(request_iterator):
            if n >= self.store.limits.max_upsert_batch:
                raise ResourceExhausted(f"more than {self.store.limits.max_upsert_batch} items in one Upsert stream",
                                        subject="batch size", hint="split the stream into several Upsert calls")
            passages.append(convert.passage_from_pb(item.passage))
            vectors.append(self.store.check_vectors(convert.vector_from_pb(item.vector, f"items[{n}].vector"),
                                                    f"items[{n}].vector")[0]
                           if item.HasField("vector") else None)
        if not passages:
            raise InvalidArgument.field("items", "the Upsert stream was empty")
        given = [v is not None for v in vectors]
        if any(given) and not all(given):
            raise InvalidArgument.field("items", "send a vector with every item or with none")
        ids = self.store.upsert(passages, np.stack(vectors) if all(given) else None)
        return pb.UpsertResponse(upserted=len(ids), ids=ids)

    def Delete(self, request: pb.DeleteRequest, context) -> pb.DeleteResponse:
        require_admin("Delete")
        return pb.DeleteResponse(deleted=self.store.delete(list(request.ids)))

    def CreateTenant(self, request: pb.CreateTenantRequest, context) -> pb.CreateTenantResponse:
        require_admin("CreateTenant")
        self.store.create_tenant(request.name)
        return pb.CreateTenantResponse()

    def DropTenant(self, request: pb.DropTenantRequest, context) -> pb.DropTenantResponse:
        require_admin("DropTenant")
        deleted, updated = self.store.drop_tenant(request.name)
        return pb.DropTenantResponse(deleted_passages=deleted, updated_passages=updated)

    def ListTenants(self, request: pb.ListTenantsRequest, context) -> pb.ListTenantsResponse:
        require_admin("ListTenants")
        return pb.ListTenantsResponse(names=self.store.list_tenants())

    def Grant(self, request: pb.AccessRequest, context) -> pb.AccessResponse:
        require_admin("Grant")
        return pb.AccessResponse(changed=self.store.grant(list(request.ids), request.tenant))

    def Revoke(self, request: pb.AccessRequest, context) -> pb.AccessResponse:
        require_admin("Revoke")
        return pb.AccessResponse(changed=self.store.revoke(list(request.ids), request.tenant))

    def Stats(self, request: pb.StatsRequest, context) -> pb.StatsResponse:
        st = self.store.stats()
        return pb.StatsResponse(
            passages=st.passages, dim=st.dim, model=st.model, index_kind=st.index_kind, metric=st.metric,
            manifest_json=self.store.manifest.to_json(), num_shards=st.num_shards,
            shards=[pb.ShardStats(shard_id=s.shard_id, passages=s.passages, vectors=s.passages,
                                  disk_bytes=s.disk_bytes, index_memory_bytes=s.index_memory_bytes,
                                  index_disk_bytes=s.index_disk_bytes) for s in st.shards])


def _authenticator(store) -> "Callable[[str | None], object] | None":
    """Keys are enforced from the moment the datastore holds one (checked per call, so a
    key created while serving takes effect at once). A router has no keys of its own: it
    forwards the caller's key and its shard servers decide."""
    control = getattr(store, "control", None)
    if control is None:
        return None
    return lambda key: control.authenticate(key) if control.has_keys() else None


def create_server(store: "Datastore | Router", address: str = "127.0.0.1:0",
                  config: ServerConfig = ServerConfig()) -> tuple[grpc.Server, int]:
    """A started server bound to `address` (port 0 picks a free one); returns (server, port)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="grpc"),
        interceptors=([MetricsInterceptor()] if config.metrics else []) + [ErrorInterceptor(), AuthInterceptor(_authenticator(store))],
        options=[("grpc.max_receive_message_length", config.max_message_bytes),
                 ("grpc.max_send_message_length", config.max_message_bytes)],
    )
    pb_grpc.add_DatastoreServicer_to_server(DatastoreServicer(store), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
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
    """Report SERVING or NOT_SERVING on the health service (what probes and balancers read)."""
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        server.health_servicer.set(name, status)  # type: ignore[attr-defined]


def stop_server(server: grpc.Server, config: ServerConfig = ServerConfig()) -> None:
    """Report NOT_SERVING first (so balancers drain), then stop with a grace period."""
    hs = getattr(server, "health_servicer", None)
    if hs is not None:
        hs.enter_graceful_shutdown()
    server.stop(config.grace_seconds).wait()
