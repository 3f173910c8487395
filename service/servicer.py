"""The `datastore.v1.Datastore` servicer: methods only convert and delegate to the store (an
embedded Datastore on a shard server, the Router on a router). Errors are raised as
DatastoreError and turned into statuses by service.server.ErrorInterceptor.
"""

from __future__ import annotations

import threading
import uuid
from typing import TYPE_CHECKING

import numpy as np

from datastore.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from service import convert
from service.auth import effective_tenant, require_admin
from service.pb import datastore_pb2 as pb
from service.pb import datastore_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from datastore.store import Datastore
    from service.router import Router


class DatastoreServicer(pb_grpc.DatastoreServicer):
    def __init__(self, store: Datastore | Router) -> None:
        # the embedded Datastore on a shard server, the Router (acting for each caller) on a router
        self.store = _ForCaller(store) if hasattr(store, "replica_status") else store
        self._snapshots = None  # a SnapshotSource, made on the first ReadSnapshot
        self._instance_id = uuid.uuid4().hex
        self._snapshots_lock = threading.Lock()

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
        seqs = _write_seqs(self.store)
        digests = _digests(self.store) if request.with_digest else {}
        replicas = getattr(self.store, "replica_status", None)
        return pb.StatsResponse(
            passages=st.passages, dim=st.dim, model=st.model, index_kind=st.index_kind, metric=st.metric,
            manifest_json=self.store.manifest.to_json(), num_shards=st.num_shards,
            shards=[pb.ShardStats(shard_id=s.shard_id, passages=s.passages, vectors=s.passages,
                                  disk_bytes=s.disk_bytes, index_memory_bytes=s.index_memory_bytes,
                                  index_disk_bytes=s.index_disk_bytes, write_seq=seqs.get(s.shard_id, 0),
                                  digest=digests.get(s.shard_id, ""))
                    for s in st.shards],
            replicas=replicas() if replicas is not None else [], instance_id=self._instance_id)

    def ReadSnapshot(self, request: pb.ReadSnapshotRequest, context) -> pb.SnapshotChunk:
        require_admin("ReadSnapshot")
        if not hasattr(self.store, "control") or not hasattr(self.store, "shards"):
            raise FailedPrecondition("a router holds no data to copy", hint="seed from a shard server")
        with self._snapshots_lock:
            if self._snapshots is None:
                from datastore.snapshot import SnapshotSource
                self._snapshots = SnapshotSource(self.store)
        c = self._snapshots.read(request.snapshot_id, int(request.shard_id), request.control, int(request.offset))
        return pb.SnapshotChunk(snapshot_id=c.snapshot_id, data=c.data, total_bytes=c.total_bytes, sha256=c.sha256,
                                write_seq=c.write_seq, last=c.last)


class _ForCaller:
    """A router seen through an RPC: every method runs marked as done for the RPC's caller,
    so the router forwards the caller's key (or none), never its own."""

    def __init__(self, router: Router) -> None:
        self._router = router

    def __getattr__(self, name: str):
        from service.router import ON_BEHALF_OF_CALLER

        attr = getattr(self._router, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            token = ON_BEHALF_OF_CALLER.set(True)
            try:
                return attr(*args, **kwargs)
            finally:
                ON_BEHALF_OF_CALLER.reset(token)
        return call


def _write_seqs(store) -> dict[int, int]:
    """{shard_id: write sequence} of the shards an embedded store has open (a router: none)."""
    out = {}
    for shard in getattr(store, "shards", None) or []:
        seq = getattr(shard, "seq", None)
        if isinstance(seq, int):
            out[shard.shard_id] = seq
    return out


def _digests(store) -> dict[int, str]:
    """{shard_id: sha256 of its passages and vectors} (one read transaction per shard), to
    tell whether two replicas hold the same data. Index databases are left out: a rebuilt
    index lays out the same data differently."""
    from datastore.snapshot import shard_digest

    return {shard.shard_id: shard_digest(shard) for shard in getattr(store, "shards", None) or []
            if hasattr(shard, "env")}
