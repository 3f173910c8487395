"""The router: one public Datastore API over shard servers, each with replicas.

It embeds text queries once, fans a batch out to one replica of every shard server in
parallel (gRPC futures, each with the remaining deadline), retries another replica on
UNAVAILABLE or a missed per-shard deadline, and merges per-server top-k with the same
merge as the embedded store. Replicas are health-checked in the background. When every
replica of a server is down, the policy decides: fail with UNAVAILABLE (default) or
answer from the rest and name the missing shards.

The Router offers the methods the servicer calls on an embedded Datastore, so one
servicer serves both roles.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from datastore.encoder import Encoder
from datastore.errors import DatastoreError, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from datastore.manifest import Manifest
from datastore.records import Hit, Passage
from datastore.sharding import merge_topk, shard_of
from datastore.store import DatastoreStats, Limits, Query, ShardInfo, check_query_vectors, embed_queries
from index import SearchParams, SearchResult
from service import convert
from service.auth import API_KEY
from service.metrics import SHARD_ERRORS, SHARD_LATENCY
from service.pb import datastore_pb2 as pb
from service.pb import datastore_pb2_grpc as pb_grpc
from service.server import SERVICE_NAME
from service.status import from_rpc_error

log = logging.getLogger(__name__)
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclass(frozen=True)
class RouterConfig:
    #: One entry per shard server: the addresses of its replicas.
    servers: list[list[str]]
    #: When every replica of a server is down: False fails with UNAVAILABLE, True answers
    #: from the other servers and lists the missing shards in the response.
    partial_results: bool = False
    #: Seconds one replica may take before the router tries the next one.
    per_shard_timeout: float = 10.0
    #: Default deadline of a request that came without one.
    default_deadline: float = 30.0
    health_interval: float = 1.0
    max_message_bytes: int = 64 * 1024 * 1024
    #: Key for the router's own calls (discovering the servers); callers' keys are forwarded.
    api_key: str | None = None

    def __post_init__(self) -> None:
        if not self.servers or any(not group for group in self.servers):
            raise ValueError("servers: give at least one server, each with at least one replica address")
        for name in ("per_shard_timeout", "default_deadline", "health_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass
class _Replica:
    address: str
    channel: grpc.Channel
    stub: pb_grpc.DatastoreStub
    health: health_pb2_grpc.HealthStub
    healthy: bool = True


@dataclass
class _Server:
    """One shard server and its replicas; `shards` learned from its Stats."""

    replicas: list[_Replica]
    shards: list[int] = field(default_factory=list)
    _turn: itertools.count = field(default_factory=itertools.count)

    def order(self) -> list[_Replica]:
        """Replicas to try, healthy first, rotating so load spreads over them."""
        n = next(self._turn)
        rotated = self.replicas[n % len(self.replicas):] + self.replicas[:n % len(self.replicas)]
        return [r for r in rotated if r.healthy] + [r for r in rotated if not r.healthy]

    @property
    def name(self) -> str:
        return ",".join(r.address for r in self.replicas)


class Router:
    """Routes the Datastore API to shard servers (see module docstring)."""

    def __init__(self, config: RouterConfig, *, limits: Limits = Limits(),
                 encoder_factory: Callable[[str], Encoder] | None = None) -> None:
        self.config = config
        self.limits = limits
        opts = [("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes)]
        self.servers: list[_Server] = []
        for group in config.servers:
            replicas = []
            for address in group:
                ch = grpc.insecure_channel(address, options=opts)
                replicas.append(_Replica(address, ch, pb_grpc.DatastoreStub(ch), health_pb2_grpc.HealthStub(ch)))
            self.servers.append(_Server(replicas))
        # calls to shard servers block on the network, not the CPU: enough threads for a
        # few dozen requests in flight, each fanned out to every server
        self._pool = ThreadPoolExecutor(max_workers=min(256, 32 * len(self.servers)), thread_name_prefix="fan-out")
        self._discover()
        self._encoder_factory = encoder_factory or (lambda name: Encoder(name))
        self._encoder: Encoder | None = None
        self._encoder_lock = threading.Lock()
        self._stop = threading.Event()
        self._on_health_change: list[Callable[[bool], None]] = []
        self._health_thread = threading.Thread(target=self._watch_health, name="router-health", daemon=True)
        self._health_thread.start()

    # -- topology and health ----------------------------------------------------------------------

    def _discover(self) -> None:
        """Ask each server which shards it holds; every shard must be held by exactly one."""
        owner: dict[int, int] = {}
        stats = None
        for n, server in enumerate(self.servers):
            r = self._call(server, "Stats", pb.StatsRequest(), self.config.default_deadline, self._md())
            server.shards = sorted(s.shard_id for s in r.shards)
            stats = stats or r
            if r.num_shards != stats.num_shards or r.dim != stats.dim or r.model != stats.model:
                raise FailedPrecondition(f"server {server.name} serves another datastore "
                                         f"({r.num_shards} shards, {r.model}) than {self.servers[0].name}")
            for sid in server.shards:
                if sid in owner:
                    raise FailedPrecondition(f"shard {sid} is served by both {self.servers[owner[sid]].name} "
                                             f"and {server.name}; list replicas of one server in one --shard")
                owner[sid] = n
        missing = sorted(set(range(stats.num_shards)) - set(owner))
        if missing:
            raise FailedPrecondition(f"no server holds shards {missing}",
                                     hint="start shard servers for them and list them with --shard")
        self._owner = owner
        self.num_shards = stats.num_shards
        self.dim = stats.dim
        self.manifest = Manifest.from_json(stats.manifest_json, "the shard servers' manifest")

    def _watch_health(self) -> None:
        serving = True
        while not self._stop.wait(self.config.health_interval):
            for server in self.servers:
                for r in server.replicas:
                    try:
                        resp = r.health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                              timeout=self.config.health_interval)
                        r.healthy = resp.status == health_pb2.HealthCheckResponse.SERVING
                    except grpc.RpcError:
                        r.healthy = False
            now = self.config.partial_results or all(any(r.healthy for r in s.replicas) for s in self.servers)
            if now != serving:
                serving = now
                for fn in self._on_health_change:
                    fn(serving)

    def on_health_change(self, fn: Callable[[bool], None]) -> None:
        """Call fn(serving) whenever the router's own health flips (every server reachable)."""
        self._on_health_change.append(fn)

    def close(self) -> None:
        self._stop.set()
        self._health_thread.join(timeout=5)
        self._pool.shutdown(wait=False)
        for server in self.servers:
            for r in server.replicas:
                r.channel.close()

    # -- calls ----------------------------------------------------------------------------------

    def _md(self) -> tuple | None:
        """Metadata for calls made on behalf of the current caller: their key, forwarded (the
        shard servers authenticate it), or the router's own key for its own calls."""
        key = API_KEY.get() or self.config.api_key
        return (("authorization", f"Bearer {key}"),) if key else None

    def _call(self, server: _Server, method: str, request, timeout: float | None, md: tuple | None = None):
        """Call one replica after another until one answers or the deadline passes."""
        deadline = time.monotonic() + (timeout or self.config.default_deadline)
        last: grpc.RpcError | None = None
        for replica in server.order():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            t = time.perf_counter()
            try:
                out = getattr(replica.stub, method)(request, timeout=min(left, self.config.per_shard_timeout),
                                                    metadata=md)
                SHARD_LATENCY.labels(replica.address, method).observe(time.perf_counter() - t)
                return out
            except grpc.RpcError as e:
                SHARD_ERRORS.labels(replica.address, method, e.code().name).inc()
                if e.code() not in RETRYABLE:
                    raise from_rpc_error(e) from None
                replica.healthy = False
                last = e
        raise Unavailable(f"shard server {server.name} (shards {server.shards}) did not answer"
                          + (f": {last.details()}" if last is not None else ""),
                          hint="check the shard servers; the router retries other replicas")

    def _fan_out(self, method: str, requests: dict[int, object], timeout: float | None) -> dict[int, object]:
        """Call servers (by position) in parallel threads; DatastoreError per failed server."""
        def run(n: int) -> object:
            try:
                return self._call(self.servers[n], method, requests[n], timeout)
            except DatastoreError as e:
                return e

        futures = {n: self._pool.submit(run, n) for n in requests}
        return {n: f.result() for n, f in futures.items()}

    # -- the Datastore API ------------------------------------------------------------------------

    @property
    def encoder(self) -> Encoder:
        with self._encoder_lock:
            if self._encoder is None:
                self._encoder = self._encoder_factory(self.manifest.model.name)
            return self._encoder

    def check_vectors(self, vectors: np.ndarray, name: str = "vector") -> np.ndarray:
        return check_query_vectors(vectors, self.dim, name)

    def search_with_coverage(self, queries: Sequence[Query], k: int = 10, tenant: str | None = None,
                             metadata_filter: dict[str, str] | None = None, params: SearchParams | None = None,
                             include_text: bool = True, timeout: float | None = None
                             ) -> tuple[list[list[Hit]], list[int]]:
        if not isinstance(k, (int, np.integer)) or not 1 <= k <= self.limits.max_k:
            raise InvalidArgument.field("k", f"must be between 1 and {self.limits.max_k}, got {k}")
        vectors = embed_queries(queries, self.dim, self.limits, lambda: self.encoder)  # embed once, not per shard
        request = pb.SearchRequest(queries=[convert.query_to_pb(v) for v in vectors], k=k, tenant=tenant,
                                   metadata_filter=metadata_filter or {}, params=convert.params_to_pb(params),
                                   include_text=include_text)
        answers = self._fan_out("Search", {n: request for n in range(len(self.servers))}, timeout)
        parts, passages, missing = [], {}, []
        for n, answer in answers.items():
            if isinstance(answer, Unavailable) and self.config.partial_results:
                missing += self.servers[n].shards
                continue
            if isinstance(answer, DatastoreError):
                raise answer
            missing += list(answer.missing_shards)
            rows = convert.hits_from_pb(answer)
            ids = np.full((len(vectors), k), -1, np.int64)
            scores = np.full((len(vectors), k), -np.inf, np.float32)
            for q, row in enumerate(rows):
                for j, h in enumerate(row[:k]):
                    ids[q, j], scores[q, j] = h.id, h.score
                    passages[h.id] = h.passage
            parts.append(SearchResult(ids, scores))
        if not parts:
            raise Unavailable(f"no shard server answered (shards {sorted(missing)} missing)")
        merged = merge_topk(parts, k)
        hits = [[Hit(i, s, passages.get(i)) for i, s in merged.row(q)] for q in range(merged.num_queries)]
        return hits, sorted(missing)

    def search(self, queries: Sequence[Query], k: int = 10, tenant: str | None = None,
               metadata_filter: dict[str, str] | None = None, params: SearchParams | None = None,
               include_text: bool = True) -> list[list[Hit]]:
        return self.search_with_coverage(queries, k, tenant, metadata_filter, params, include_text)[0]

    def _by_server(self, ids: Sequence[int]) -> dict[int, list[int]]:
        """Positions of ids grouped by the server that owns their shard."""
        where = shard_of(np.asarray(ids, np.int64), self.num_shards)
        groups: dict[int, list[int]] = {}
        for pos, sid in enumerate(where.tolist()):
            groups.setdefault(self._owner[sid], []).append(pos)
        return groups

    def get_passages(self, ids: Sequence[int], tenant: str | None = None,
                     timeout: float | None = None) -> list[Passage]:
        if len(ids) == 0:
            raise InvalidArgument.field("ids", "no ids given")
        ids = [int(i) for i in ids]
        groups = self._by_server(ids)
        answers = self._fan_out("GetPassages", {n: pb.GetPassagesRequest(ids=[ids[p] for p in pos], tenant=tenant)
                                                for n, pos in groups.items()}, timeout)
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

    def upsert(self, passages: Sequence[Passage], vectors: np.ndarray | None = None,
               timeout: float | None = None) -> list[int]:
        """Passages with ids go to their shard's server; new ones are spread round-robin, and
        the server that takes one assigns it an id of its own shards."""
        if len(passages) == 0:
            raise InvalidArgument.field("passages", "nothing to upsert")
        if vectors is not None:
            vectors = self.check_vectors(vectors, "vectors")
        groups: dict[int, list[int]] = {}
        known = [n for n, p in enumerate(passages) if p.id >= 0]
        for n, pos in self._by_server([passages[i].id for i in known]).items():
            groups.setdefault(n, []).extend(known[p] for p in pos)
        for j, n in enumerate(i for i, p in enumerate(passages) if p.id < 0):
            groups.setdefault(j % len(self.servers), []).append(n)
        results: dict[int, list[int]] = {}
        errors: list[DatastoreError] = []
        md = self._md()

        def run(server: int, pos: list[int]) -> None:
            def items(ids: list[int] | None) -> list[pb.UpsertItem]:
                out = []
                for j, i in enumerate(pos):
                    p = passages[i] if ids is None else Passage(ids[j], passages[i].text, passages[i].title,
                                                                passages[i].source, passages[i].tenants,
                                                                passages[i].metadata)
                    item = pb.UpsertItem(passage=convert.passage_to_pb(p))
                    if vectors is not None:
                        item.vector.CopyFrom(convert.vector_to_pb(vectors[i]))
                    out.append(item)
                return out

            try:
                results[server] = self._replicate(self.servers[server], "Upsert",
                                                  lambda ids: iter(items(ids)), timeout, md).ids[:]
            except DatastoreError as e:
                errors.append(e)

        for f in [self._pool.submit(run, n, pos) for n, pos in groups.items()]:
            f.result()
        if errors:
            raise errors[0]
        out = [0] * len(passages)
        for n, pos in groups.items():
            for i, pid in zip(pos, results[n]):
                out[i] = pid
        return out

    def delete(self, ids: Sequence[int], timeout: float | None = None) -> int:
        if len(ids) == 0:
            raise InvalidArgument.field("ids", "no ids given")
        ids = [int(i) for i in ids]
        groups = self._by_server(ids)
        deleted = 0
        for n, pos in groups.items():
            request = pb.DeleteRequest(ids=[ids[p] for p in pos])
            deleted += self._replicate(self.servers[n], "Delete", lambda _ids: request, timeout, self._md()).deleted
        return deleted

    def _replicate(self, server: _Server, method: str, request: Callable[[list[int] | None], object],
                   timeout: float | None, md: tuple | None):
        """A write to every replica of a server: the first that answers (the primary) assigns
        new ids, the others get the same ids; the answer is the primary's. A replica that
        fails is marked unhealthy and logged: it has missed a write and needs a resync."""
        answer, primary = None, None
        for replica in server.order():
            try:
                answer = getattr(replica.stub, method)(request(None), timeout=timeout or self.config.per_shard_timeout,
                                                       metadata=md)
                primary = replica
                break
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE:
                    raise from_rpc_error(e) from None
                replica.healthy = False
        if primary is None:
            raise Unavailable(f"no replica of shard server {server.name} took the {method}")
        ids = list(answer.ids) if method == "Upsert" else None
        for replica in server.replicas:
            if replica is primary:
                continue
            try:
                getattr(replica.stub, method)(request(ids), timeout=timeout or self.config.per_shard_timeout,
                                              metadata=md)
            except grpc.RpcError as e:
                replica.healthy = False
                log.error("replica %s missed a %s (%s): it needs a resync", replica.address, method, e.code().name)
        return answer

    def _every_server(self, method: str, request) -> list:
        """A control write (tenants) to every replica of every server."""
        md = self._md()
        return [self._replicate(server, method, lambda _ids: request, None, md) for server in self.servers]

    def create_tenant(self, name: str) -> None:
        self._every_server("CreateTenant", pb.CreateTenantRequest(name=name))

    def drop_tenant(self, name: str) -> tuple[int, int]:
        answers = self._every_server("DropTenant", pb.DropTenantRequest(name=name))
        return sum(a.deleted_passages for a in answers), sum(a.updated_passages for a in answers)

    def list_tenants(self) -> list[str]:
        return list(self._call(self.servers[0], "ListTenants", pb.ListTenantsRequest(), None, self._md()).names)

    def grant(self, ids: Sequence[int], tenant: str) -> int:
        return self._access("Grant", ids, tenant)

    def revoke(self, ids: Sequence[int], tenant: str) -> int:
        return self._access("Revoke", ids, tenant)

    def _access(self, method: str, ids: Sequence[int], tenant: str) -> int:
        if len(ids) == 0:
            raise InvalidArgument.field("ids", "no ids given")
        ids = [int(i) for i in ids]
        md = self._md()
        return sum(self._replicate(self.servers[n], method, lambda _ids, pos=pos: pb.AccessRequest(
            ids=[ids[p] for p in pos], tenant=tenant), None, md).changed for n, pos in self._by_server(ids).items())

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
