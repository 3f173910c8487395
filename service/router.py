"""The router: one public Datastore API over shard servers, each with replicas.

It embeds text queries once, fans a batch out to one replica of every shard server in
parallel, retries another replica on UNAVAILABLE or a missed per-shard deadline (within
the caller's deadline), optionally hedges a slow call to a second replica, and merges
per-server top-k with the same merge as the embedded store. When every replica of a server
is down, the policy decides: fail with UNAVAILABLE (default) or answer from the rest and
name the missing shards.

The Router offers the methods the servicer calls on an embedded Datastore, so one servicer
serves both roles. It ties together the parts in service/routing/: topology.py (which
server holds which shards, replica health), fanout.py (reads: retries, hedging, search
batching, the merge), replication.py (writes to every in-sync replica, the write log and
resyncing stale replicas) and loop.py (the asyncio loop thread the shard calls run in).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from datastore.encoder import Encoder
from datastore.errors import DatastoreError, InvalidArgument, NotFound
from datastore.manifest import Manifest
from datastore.records import Hit, Passage
from datastore.store import (
    DatastoreStats,
    Limits,
    Query,
    ShardInfo,
    check_ids,
    check_query_vectors,
    check_search_size,
    embed_queries,
)
from index import SearchParams
from service import convert
from service.auth import API_KEY
from service.pb import datastore_pb2 as pb
from service.routing.config import DEADLINE_RESERVE, DEADLINE_RESERVE_MAX_S, RETRYABLE, RouterConfig
from service.routing.fanout import HEDGES, FanOut, merge_search
from service.routing.loop import Loop
from service.routing.replication import (
    CATCH_UP_LOCKED,
    CATCH_UP_ROUNDS,
    WRITE_LOG_MAX_BYTES,
    WRITE_LOG_MAX_ENTRIES,
    Replication,
    WriteRequest,
    fixed,
)
from service.routing.topology import REPLICA_HEALTHY, REPLICA_STALE, Server, Topology

log = logging.getLogger(__name__)
#: True while the router works for an RPC's caller (set by the servicer): their key, or none,
#: is forwarded, never the router's own (which would lend a keyless caller its rights).
ON_BEHALF_OF_CALLER: contextvars.ContextVar[bool] = contextvars.ContextVar("on_behalf_of_caller", default=False)


class Router:
    """Routes the Datastore API to shard servers (see module docstring)."""

    def __init__(self, config: RouterConfig, *, limits: Limits = Limits(),  # noqa: B008  # frozen, shared
                 encoder_factory: Callable[[str], Encoder] | None = None) -> None:
        self.config = config
        self.limits = limits
        self._loop = Loop()
        self._topology = Topology(config)
        self._loop.run(self._topology.connect())
        self._fanout = FanOut(self._topology, limits)
        self._replication = Replication(self._topology)
        self._encoder_factory = encoder_factory or (lambda name: Encoder(name))
        self._encoder: Encoder | None = None
        self._query_encoders: dict[str, Any] = {}  # compat models' encoders, by name
        self._encoder_lock = threading.Lock()
        self._on_health_change: list[Callable[[bool], None]] = []
        self._serving = True
        self._closed = False
        try:
            self._loop.run(self._topology.discover())
        except BaseException:
            self.close()
            raise
        self._health_task = asyncio.run_coroutine_threadsafe(self._watch_health(), self._loop.loop)

    # what discovery found (read by the servicer and the Datastore API below)
    @property
    def servers(self) -> list[Server]:
        return self._topology.servers

    @property
    def num_shards(self) -> int:
        return self._topology.num_shards

    @property
    def dim(self) -> int:
        return self._topology.dim

    @property
    def manifest(self) -> Manifest:
        return self._topology.manifest

    # -- health -----------------------------------------------------------------------------------

    async def _watch_health(self) -> None:
        """Each health_interval: check every replica, try to resync the stale ones that
        answer, and report when the router's own health flips."""
        while True:
            await asyncio.sleep(self.config.health_interval)
            try:
                await asyncio.gather(*(self._topology.check(r) for s in self.servers for r in s.replicas))
                await asyncio.gather(*(self._replication.verify(s, r) for s in self.servers for r in s.replicas
                                       if r.stale and r.healthy))
            except Exception:  # the watcher must outlive any one bad round
                log.exception("health round failed")
            now = self._topology.serving()
            if now != self._serving:
                self._serving = now
                for fn in self._on_health_change:
                    fn(now)

    def on_health_change(self, fn: Callable[[bool], None]) -> None:
        """Call fn(serving) whenever the router's own health flips (every server has a
        healthy in-sync replica)."""
        self._on_health_change.append(fn)

    def replica_status(self) -> list[pb.ReplicaStatus]:
        return self._topology.replica_status()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        task = getattr(self, "_health_task", None)
        if task is not None:
            task.cancel()
        try:
            self._loop.run(self._topology.close(), timeout=5)
        finally:
            self._loop.stop()

    # -- calls ----------------------------------------------------------------------------------

    def _md(self) -> tuple | None:
        """Metadata for calls made for the current caller: an RPC caller's key, forwarded as
        is (the shard servers authenticate it), or for in-process use the router's own key.
        Read in the caller's thread: the loop thread does not see its context variables."""
        key = API_KEY.get() if ON_BEHALF_OF_CALLER.get() else (API_KEY.get() or self.config.api_key)
        return (("authorization", f"Bearer {key}"),) if key else None

    def _deadline(self, timeout: float | None) -> float:
        """Loop-clock deadline for the shard calls of a request with `timeout` seconds left,
        less a reserve for the router's own work."""
        t = timeout if timeout is not None and timeout > 0 else self.config.default_deadline
        return self._loop.loop.time() + t - min(DEADLINE_RESERVE * t, DEADLINE_RESERVE_MAX_S)

    def _fan_out(self, method: str, requests: dict[int, object], timeout: float | None,
                 hedge: bool = False) -> dict[int, object]:
        # md is read here, in the caller's thread: the loop does not see its context variables
        return self._loop.run(self._fanout.gather(method, requests, self._deadline(timeout), self._md(), hedge))

    # -- reads ----------------------------------------------------------------------------------

    @property
    def encoder(self) -> Encoder:
        with self._encoder_lock:
            if self._encoder is None:
                self._encoder = self._encoder_factory(self.manifest.model.name)
            return self._encoder

    def _embed(self, queries: Sequence[Query], params: SearchParams | None) -> np.ndarray:
        """Texts embedded by the model `params.query_model` names (a compat model of a binary
        datastore), else by the datastore's own; the shard servers check the name."""
        from datastore import compat

        record = compat.query_model(self.manifest, params)
        if record is None:
            return embed_queries(queries, self.dim, self.limits, lambda: self.encoder)
        with self._encoder_lock:
            if record["name"] not in self._query_encoders:
                self._query_encoders[record["name"]] = compat.make_encoder(record["name"])
            encoder = self._query_encoders[record["name"]]
        return embed_queries(queries, int(record["dim"]), self.limits, lambda: encoder)

    def check_vectors(self, vectors: np.ndarray, name: str = "vector") -> np.ndarray:
        return check_query_vectors(vectors, self.dim, name)

    def search_with_coverage(self, queries: Sequence[Query], k: int = 10, tenant: str | None = None,
                             metadata_filter: dict[str, str] | None = None, params: SearchParams | None = None,
                             include_text: bool = True, timeout: float | None = None
                             ) -> tuple[list[list[Hit]], list[int]]:
        if not isinstance(k, (int, np.integer)) or not 1 <= k <= self.limits.max_k:
            raise InvalidArgument.field("k", f"must be between 1 and {self.limits.max_k}, got {k}")
        check_search_size(k, len(queries), params, self.limits)
        vectors = self._embed(queries, params)  # embed once, not per shard
        request = pb.SearchRequest(k=k, tenant=tenant, metadata_filter=metadata_filter or {},
                                   params=convert.params_to_pb(params), include_text=include_text)
        queries_pb = [convert.query_to_pb(v) for v in vectors]
        md, deadline = self._md(), self._deadline(timeout)
        if self.config.batch_in_flight:
            answers = self._loop.run(self._fanout.batched_search(request, queries_pb, deadline, md))
        else:
            request.queries.extend(queries_pb)
            answers = {n: a if isinstance(a, DatastoreError) else (a.results, a.missing_shards) for n, a in
                       self._loop.run(self._fanout.gather("Search", {n: request for n in range(len(self.servers))},
                                                          deadline, md, True)).items()}
        return merge_search(answers, self.servers, len(vectors), k, self.config.partial_results)

    def search(self, queries: Sequence[Query], k: int = 10, tenant: str | None = None,
               metadata_filter: dict[str, str] | None = None, params: SearchParams | None = None,
               include_text: bool = True) -> list[list[Hit]]:
        return self.search_with_coverage(queries, k, tenant, metadata_filter, params, include_text)[0]

    def get_passages(self, ids: Sequence[int], tenant: str | None = None,
                     timeout: float | None = None) -> list[Passage]:
        if len(ids) == 0:
            raise InvalidArgument.field("ids", "no ids given")
        check_ids(ids)
        ids = [int(i) for i in ids]
        groups = self._topology.by_server(ids)
        answers = self._fan_out("GetPassages", {n: pb.GetPassagesRequest(ids=[ids[p] for p in pos], tenant=tenant)
                                                for n, pos in groups.items()}, timeout, hedge=True)
        out: list[Passage | None] = [None] * len(ids)
        not_found = []
        for n, answer in answers.items():
            if isinstance(answer, NotFound):
                not_found.append(answer)
                continue
            if isinstance(answer, DatastoreError):
                raise answer
            for p, msg in zip(groups[n], answer.passages):
                out[p] = convert.passage_from_pb(msg)
        if not_found:
            names = ",".join(e.resource_name for e in not_found if e.resource_name)
            raise NotFound("; ".join(e.message for e in not_found), resource_type="passage", resource_name=names)
        return out  # type: ignore[return-value]

    def list_tenants(self) -> list[str]:
        answer = self._fan_out("ListTenants", {0: pb.ListTenantsRequest()}, None)[0]
        if isinstance(answer, DatastoreError):
            raise answer
        return list(answer.names)

    def stats(self) -> DatastoreStats:
        answers = self._fan_out("Stats", {n: pb.StatsRequest() for n in range(len(self.servers))}, None)
        shards = []
        for answer in answers.values():
            if isinstance(answer, DatastoreError):
                raise answer
            shards += [ShardInfo(s.shard_id, s.passages, s.disk_bytes, s.index_memory_bytes, s.index_disk_bytes)
                       for s in answer.shards]
        shards.sort(key=lambda s: s.shard_id)
        m = self.manifest
        return DatastoreStats(sum(s.passages for s in shards), self.dim, m.model.name, m.index.kind, m.index.metric,
                              shards, self.num_shards)

    # -- writes ---------------------------------------------------------------------------------

    def _write_each(self, calls: dict[int, tuple[str, WriteRequest]], timeout: float | None) -> dict[int, object]:
        """Writes to several servers at once; the first error is raised once all finished."""
        md, deadline = self._md(), self._deadline(timeout)

        async def run():
            async def one(n, method, request):
                try:
                    return await self._replication.replicate(self.servers[n], method, request, deadline, md)
                except DatastoreError as e:
                    return e
            keys = list(calls)
            return dict(zip(keys, await asyncio.gather(*(one(n, *calls[n]) for n in keys))))

        out = self._loop.run(run())
        for answer in out.values():
            if isinstance(answer, DatastoreError):
                raise answer
        return out

    def upsert(self, passages: Sequence[Passage], vectors: np.ndarray | None = None,
               timeout: float | None = None) -> list[int]:
        """Passages with ids go to their shard's server; new ones are spread round-robin, and
        the server that takes one assigns it an id of its own shards."""
        if len(passages) == 0:
            raise InvalidArgument.field("passages", "nothing to upsert")
        check_ids([p.id for p in passages if p.id >= 0], "passages.id")
        if vectors is not None:
            vectors = self.check_vectors(vectors, "vectors")
        groups: dict[int, list[int]] = {}
        known = [n for n, p in enumerate(passages) if p.id >= 0]
        for n, pos in self._topology.by_server([passages[i].id for i in known]).items():
            groups.setdefault(n, []).extend(known[p] for p in pos)
        for j, n in enumerate(i for i, p in enumerate(passages) if p.id < 0):
            groups.setdefault(j % len(self.servers), []).append(n)

        def items_for(pos: list[int]) -> WriteRequest:
            def items(ids: list[int] | None):
                out = []
                for j, i in enumerate(pos):
                    p = passages[i] if ids is None else Passage(ids[j], passages[i].text, passages[i].title,
                                                                passages[i].source, passages[i].tenants,
                                                                passages[i].metadata)
                    item = pb.UpsertItem(passage=convert.passage_to_pb(p))
                    if vectors is not None:
                        item.vector.CopyFrom(convert.vector_to_pb(vectors[i]))
                    out.append(item)
                return iter(out)
            return items

        results = self._write_each({n: ("Upsert", items_for(pos)) for n, pos in groups.items()}, timeout)
        out = [0] * len(passages)
        for n, pos in groups.items():
            for i, pid in zip(pos, results[n].ids):
                out[i] = pid
        return out

    def delete(self, ids: Sequence[int], timeout: float | None = None) -> int:
        if len(ids) == 0:
            raise InvalidArgument.field("ids", "no ids given")
        check_ids(ids)
        ids = [int(i) for i in ids]
        calls = {n: ("Delete", fixed(pb.DeleteRequest(ids=[ids[p] for p in pos])))
                 for n, pos in self._topology.by_server(ids).items()}
        return sum(a.deleted for a in self._write_each(calls, timeout).values())

    def _every_server(self, method: str, request) -> list:
        """A control write (tenants) to every replica of every server."""
        calls = {n: (method, fixed(request)) for n in range(len(self.servers))}
        return list(self._write_each(calls, None).values())

    def create_tenant(self, name: str) -> None:
        self._every_server("CreateTenant", pb.CreateTenantRequest(name=name))

    def drop_tenant(self, name: str) -> tuple[int, int]:
        answers = self._every_server("DropTenant", pb.DropTenantRequest(name=name))
        return sum(a.deleted_passages for a in answers), sum(a.updated_passages for a in answers)

    def grant(self, ids: Sequence[int], tenant: str) -> int:
        return self._access("Grant", ids, tenant)

    def revoke(self, ids: Sequence[int], tenant: str) -> int:
        return self._access("Revoke", ids, tenant)

    def _access(self, method: str, ids: Sequence[int], tenant: str) -> int:
        if len(ids) == 0:
            raise InvalidArgument.field("ids", "no ids given")
        check_ids(ids)
        ids = [int(i) for i in ids]
        calls = {n: (method, fixed(pb.AccessRequest(ids=[ids[p] for p in pos], tenant=tenant)))
                 for n, pos in self._topology.by_server(ids).items()}
        return sum(a.changed for a in self._write_each(calls, None).values())


__all__ = [
    "CATCH_UP_LOCKED", "CATCH_UP_ROUNDS", "DEADLINE_RESERVE", "DEADLINE_RESERVE_MAX_S", "HEDGES",
    "ON_BEHALF_OF_CALLER", "REPLICA_HEALTHY", "REPLICA_STALE", "RETRYABLE", "WRITE_LOG_MAX_BYTES",
    "WRITE_LOG_MAX_ENTRIES", "Router", "RouterConfig",
]
