"""Which shard server holds which shards, its replicas, and their health.

At start the router asks every replica for its Stats: every shard must be held by exactly
one server, all replicas of a server must hold the same shards of the same datastore, and
the replicas at a server's highest write sequences are taken as in sync (the others are
stale: not read until verified, see replication.py). The health loop then checks every
replica each `health_interval`; reads prefer healthy in-sync replicas, rotating over them.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import Gauge

from datastore.errors import FailedPrecondition, Unavailable
from datastore.manifest import Manifest
from datastore.sharding import shard_of
from service.metrics import REGISTRY
from service.pb import datastore_pb2 as pb
from service.pb import datastore_pb2_grpc as pb_grpc
from service.routing.config import RETRYABLE, RouterConfig
from service.server import SERVICE_NAME
from service.status import from_rpc_error

#: The router's parts all log as "service.router", as the router did in one module, so
#: existing log filters and alerts keep matching.
log = logging.getLogger("service.router")

REPLICA_STALE = Gauge("datastore_router_replica_stale", "1 while a replica is stale (not read from)",
                      ["replica"], registry=REGISTRY)
REPLICA_HEALTHY = Gauge("datastore_router_replica_healthy", "1 while a replica answers health checks",
                        ["replica"], registry=REGISTRY)


@dataclass
class Replica:
    address: str
    channel: grpc.aio.Channel
    stub: pb_grpc.DatastoreStub
    health: health_pb2_grpc.HealthStub
    healthy: bool = True
    #: Not read from: missed a write, or not yet verified in sync.
    stale: bool = True
    reason: str = "not verified yet"
    seqs: dict[int, int] = field(default_factory=dict)
    #: (reference, both servers' instance ids, write sequences) of the last content comparison.
    digest_checked: tuple | None = None


@dataclass
class Server:
    """One shard server and its replicas; `shards` learned from its Stats."""

    replicas: list[Replica]
    shards: list[int] = field(default_factory=list)
    _turn: itertools.count = field(default_factory=itertools.count)
    #: Writes to this server, one at a time (set in the loop).
    write_lock: asyncio.Lock | None = None
    #: While a replica is stale: the writes sent since, with the write sequences before and
    #: after each, so a replica seeded meanwhile can be brought up to date (see catch_up).
    log: collections.deque = field(default_factory=collections.deque)
    log_bytes: int = 0
    #: Write sequences of the in-sync replicas after the last logged write (None: unknown,
    #: the next write asks for them first).
    log_tail: dict[int, int] | None = None

    def reset_log(self) -> None:
        self.log.clear()
        self.log_bytes, self.log_tail = 0, None

    def order(self) -> list[Replica]:
        """In-sync replicas to try, healthy first, rotating so load spreads over them."""
        n = next(self._turn) % len(self.replicas)
        rotated = [r for r in self.replicas[n:] + self.replicas[:n] if not r.stale]
        return [r for r in rotated if r.healthy] + [r for r in rotated if not r.healthy]

    @property
    def name(self) -> str:
        return ",".join(r.address for r in self.replicas)


def mark_stale(replica: Replica, reason: str) -> None:
    if not replica.stale:
        log.error("replica %s is stale: %s; it is not read from until it is resynced "
                  "(restart it with --seed-from a live replica)", replica.address, reason)
    replica.stale, replica.reason = True, reason
    REPLICA_STALE.labels(replica.address).set(1)


class Topology:
    """The shard servers as the router found them; `num_shards`, `dim` and `manifest` are
    set by `discover` (coroutines here run in the router's loop)."""

    num_shards: int
    dim: int
    manifest: Manifest

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.servers: list[Server] = []
        self.owner: dict[int, int] = {}  # shard id -> position of its server

    async def connect(self) -> None:
        opts = [("grpc.max_receive_message_length", self.config.max_message_bytes),
                ("grpc.max_send_message_length", self.config.max_message_bytes)]
        servers = []
        for group in self.config.servers:
            replicas = []
            for address in group:
                ch = grpc.aio.insecure_channel(address, options=opts)
                replicas.append(Replica(address, ch, pb_grpc.DatastoreStub(ch), health_pb2_grpc.HealthStub(ch)))
                REPLICA_STALE.labels(address).set(1)
            servers.append(Server(replicas, write_lock=asyncio.Lock()))
        self.servers = servers

    def own_md(self) -> tuple | None:
        """Metadata for the router's own calls (discovery, sync checks): its own key."""
        key = self.config.api_key
        return (("authorization", f"Bearer {key}"),) if key else None

    async def replica_stats(self, replica: Replica, timeout: float, digest: bool = False
                            ) -> pb.StatsResponse | None:
        try:
            return await replica.stub.Stats(pb.StatsRequest(with_digest=digest), timeout=timeout,
                                            metadata=self.own_md())
        except grpc.RpcError as e:
            if e.code() not in RETRYABLE:
                raise from_rpc_error(e) from None
            replica.healthy = False
            return None

    async def discover(self) -> None:
        """Ask every replica which shards it holds (every shard must be held by exactly one
        server) and its write sequences: replicas at the highest sequences are in sync."""
        owner: dict[int, int] = {}
        first: pb.StatsResponse | None = None
        for n, server in enumerate(self.servers):
            answers = await asyncio.gather(*(self.replica_stats(r, self.config.default_deadline)
                                             for r in server.replicas))
            live = [(r, a) for r, a in zip(server.replicas, answers) if a is not None]
            if not live:
                raise Unavailable(f"no replica of shard server {server.name} answered",
                                  hint="start the shard servers before the router")
            for r, a in live:
                first = first or a
                if a.num_shards != first.num_shards or a.dim != first.dim or a.model != first.model:
                    raise FailedPrecondition(f"{r.address} serves another datastore ({a.num_shards} shards, "
                                             f"{a.model}) than {self.servers[0].name}")
                r.seqs = {s.shard_id: s.write_seq for s in a.shards}
            shard_sets = {tuple(sorted(r.seqs)) for r, _ in live}
            if len(shard_sets) != 1:
                raise FailedPrecondition(f"the replicas of {server.name} serve different shards: "
                                         + "; ".join(f"{r.address}: {sorted(r.seqs)}" for r, _ in live))
            server.shards = sorted(live[0][0].seqs)
            best = max((tuple(sorted(r.seqs.items())) for r, _ in live), key=lambda t: sum(v for _, v in t))
            for r, _ in live:
                if tuple(sorted(r.seqs.items())) == best:
                    r.stale, r.reason = False, ""
                    REPLICA_STALE.labels(r.address).set(0)
                else:
                    mark_stale(r, f"its write sequences {r.seqs} are behind {dict(best)}")
            for sid in server.shards:
                if sid in owner:
                    raise FailedPrecondition(f"shard {sid} is served by both {self.servers[owner[sid]].name} "
                                             f"and {server.name}; list replicas of one server in one --shard")
                owner[sid] = n
        assert first is not None
        missing = sorted(set(range(first.num_shards)) - set(owner))
        if missing:
            raise FailedPrecondition(f"no server holds shards {missing}",
                                     hint="start shard servers for them and list them with --shard")
        self.owner = owner
        self.num_shards = first.num_shards
        self.dim = first.dim
        self.manifest = Manifest.from_json(first.manifest_json, "the shard servers' manifest")

    async def check(self, replica: Replica) -> None:
        """One health check of a replica (the health loop runs it for all, each interval)."""
        try:
            resp = await replica.health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                              timeout=self.config.health_interval)
            replica.healthy = resp.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            replica.healthy = False
        REPLICA_HEALTHY.labels(replica.address).set(int(replica.healthy))

    def serving(self) -> bool:
        """Whether every server has a healthy in-sync replica (or partial answers are fine)."""
        return self.config.partial_results or all(
            any(r.healthy and not r.stale for r in s.replicas) for s in self.servers)

    def replica_status(self) -> list[pb.ReplicaStatus]:
        return [pb.ReplicaStatus(address=r.address, shard_ids=s.shards, healthy=r.healthy, stale=r.stale,
                                 reason=r.reason) for s in self.servers for r in s.replicas]

    def by_server(self, ids: Sequence[int]) -> dict[int, list[int]]:
        """Positions of ids grouped by the server that owns their shard."""
        where = shard_of(np.asarray(ids, np.int64), self.num_shards)
        groups: dict[int, list[int]] = {}
        for pos, sid in enumerate(where.tolist()):
            groups.setdefault(self.owner[sid], []).append(pos)
        return groups

    async def close(self) -> None:
        for server in self.servers:
            for r in server.replicas:
                await r.channel.close()
