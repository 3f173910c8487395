"""The Python client: typed results in, typed errors out (decoded from status details)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import grpc
import numpy as np

from datastore.errors import DatastoreError, InvalidArgument
from datastore.records import Hit, Passage
from index import SearchParams
from service import convert
from service.pb import datastore_pb2 as pb
from service.pb import datastore_pb2_grpc as pb_grpc
from service.status import from_rpc_error


@dataclass(frozen=True)
class RemoteStats:
    passages: int
    dim: int
    model: str
    index_kind: str
    metric: str
    shards: list[dict[str, int]]
    manifest: dict[str, Any]
    #: A router's replicas: address, shard_ids, healthy, stale (not read from) and why.
    replicas: list[dict[str, Any]] = field(default_factory=list)


class DatastoreClient:
    """A connection to a datastore server (`host:port`). Every method raises DatastoreError
    subclasses (InvalidArgument, NotFound, ...), never a bare grpc.RpcError."""

    def __init__(self, address: str, timeout: float = 60.0, max_message_bytes: int = 64 * 1024 * 1024,
                 api_key: str | None = None, tls_ca: str | None = None) -> None:
        """`api_key` goes with every call; `tls_ca` (a PEM file) switches to TLS."""
        self.address = address
        self.timeout = timeout
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes)]
        if tls_ca is not None:
            with open(tls_ca, "rb") as f:
                self._channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(f.read()), options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
        self._stub = pb_grpc.DatastoreStub(self._channel)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method, request, timeout: float | None):
        try:
            return method(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def search(self, queries: Sequence[str | np.ndarray], k: int = 10, tenant: str | None = None,
               metadata_filter: dict[str, str] | None = None, params: SearchParams | None = None,
               include_text: bool = True, timeout: float | None = None) -> list[list[Hit]]:
        """Top-k hits for each query (a text or a vector), in query order."""
        if isinstance(queries, (str, np.ndarray)) and not (isinstance(queries, np.ndarray) and queries.ndim == 2):
            queries = [queries]
        if not isinstance(k, int) or not 0 <= k < 2**32:  # the rest is the server's to judge
            raise InvalidArgument.field("k", f"must be a positive integer, got {k!r}")
        req = pb.SearchRequest(queries=[convert.query_to_pb(q) for q in queries], k=k, tenant=tenant,
                               metadata_filter=metadata_filter or {}, params=convert.params_to_pb(params),
                               include_text=include_text)
        return convert.hits_from_pb(self._call(self._stub.Search, req, timeout))

    def get_passages(self, ids: Sequence[int], tenant: str | None = None,
                     timeout: float | None = None) -> list[Passage]:
        resp = self._call(self._stub.GetPassages, pb.GetPassagesRequest(ids=list(ids), tenant=tenant), timeout)
        return [convert.passage_from_pb(p) for p in resp.passages]

    def upsert(self, passages: Sequence[Passage], vectors: np.ndarray | None = None,
               timeout: float | None = None) -> list[int]:
        """Stream passages (with vectors, or texts the server embeds); ids once durable."""

        def items() -> Iterator[pb.UpsertItem]:
            for n, p in enumerate(passages):
                item = pb.UpsertItem(passage=convert.passage_to_pb(p))
                if vectors is not None:
                    item.vector.CopyFrom(convert.vector_to_pb(vectors[n]))
                yield item

        return list(self._call(self._stub.Upsert, items(), timeout).ids)

    def delete(self, ids: Sequence[int], timeout: float | None = None) -> int:
        return self._call(self._stub.Delete, pb.DeleteRequest(ids=list(ids)), timeout).deleted

    def create_tenant(self, name: str, timeout: float | None = None) -> None:
        self._call(self._stub.CreateTenant, pb.CreateTenantRequest(name=name), timeout)

    def drop_tenant(self, name: str, timeout: float | None = None) -> tuple[int, int]:
        """(passages deleted, passages that lost the tenant's grant)."""
        r = self._call(self._stub.DropTenant, pb.DropTenantRequest(name=name), timeout)
        return r.deleted_passages, r.updated_passages

    def list_tenants(self, timeout: float | None = None) -> list[str]:
        return list(self._call(self._stub.ListTenants, pb.ListTenantsRequest(), timeout).names)

    def grant(self, ids: Sequence[int], tenant: str, timeout: float | None = None) -> int:
        return self._call(self._stub.Grant, pb.AccessRequest(ids=list(ids), tenant=tenant), timeout).changed

    def revoke(self, ids: Sequence[int], tenant: str, timeout: float | None = None) -> int:
        return self._call(self._stub.Revoke, pb.AccessRequest(ids=list(ids), tenant=tenant), timeout).changed

    def stats(self, timeout: float | None = None) -> RemoteStats:
        r = self._call(self._stub.Stats, pb.StatsRequest(), timeout)
        return RemoteStats(r.passages, r.dim, r.model, r.index_kind, r.metric,
                           [{"shard_id": s.shard_id, "passages": s.passages, "disk_bytes": s.disk_bytes,
                             "index_memory_bytes": s.index_memory_bytes, "index_disk_bytes": s.index_disk_bytes,
                             "write_seq": s.write_seq} for s in r.shards],
                           json.loads(r.manifest_json) if r.manifest_json else {},
                           [{"address": x.address, "shard_ids": list(x.shard_ids), "healthy": x.healthy,
                             "stale": x.stale, "reason": x.reason} for x in r.replicas])


__all__ = ["DatastoreClient", "DatastoreError", "RemoteStats"]
