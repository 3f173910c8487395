"""The router: one public Datastore API over shard servers, each with replicas.

It embeds text queries once, fans a batch out to one replica of every shard server in
parallel, retries another replica on UNAVAILABLE or a missed per-shard deadline (within
the caller's deadline), optionally hedges a slow call to a second replica, and merges
per-server top-k with the same merge as the embedded store. When every replica of a server
is down, the policy decides: fail with UNAVAILABLE (default) or answer from the rest and
name the missing shards.

Calls to shard servers run on grpc.aio channels in one asyncio loop thread (a request's
fan-out is a few coroutines, not a thread per shard call; hedging and cancellation come
with it); the servicer's worker thread hands a request to the loop and waits for the
merged answer. Searches with the same options that arrive while `batch_in_flight` of them
are out are sent together as one batched Search per server: nothing waits at low load,
and under load the per-call cost (gRPC on both sides, one scan per call) is shared.

Replica consistency: writes go to every in-sync replica of a server, one write at a time
per server (so replicas apply them in the same order), the first answering replica (the
primary) assigning new ids. A replica that misses an acknowledged write is marked stale
and no longer read; a replica is also stale until verified in sync (at start, or when it
comes back): its per-shard write sequences (Stats.write_seq) and then content digests
must equal an in-sync replica's (writes are deterministic given the same state and order,
so a write retried on another replica after a timeout gives the same ids).
`datastore serve ... --seed-from ADDR` copies the shards from a live replica, after which
the health loop verifies it and puts it back into rotation. Writes go on meanwhile, so the
copy is behind by the time it serves: while a replica of a server is stale the router logs
that server's writes (bounded, in memory) with the write sequences before and after each
(one extra Stats call per write, only then), and catches a replica up by sending it the
logged writes its copy lacks, per shard and in order (most of them while writes go on, the
last few under the write lock), before comparing sequences and digests as above; a copy
older than the log, or a missed tenant change, still needs a new --seed-from. Limits: this holds for writes
through one router (several writing routers can order writes differently); staleness is
kept in the router's memory, and a restarted router takes the replicas at the highest
write sequences it can reach as in sync; a write that failed on every replica may still
have been applied by one that timed out.

The Router offers the methods the servicer calls on an embedded Datastore, so one servicer
serves both roles.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import itertools
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import Counter, Gauge

from datastore.encoder import Encoder
from datastore.errors import (
    DatastoreError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from datastore.manifest import Manifest
from datastore.records import Hit, Passage
from datastore.sharding import merge_topk, shard_of
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
from index import SearchParams, SearchResult
from index.base import MISSING_ID
from service import convert
from service.auth import API_KEY
from service.metrics import REGISTRY, SHARD_ERRORS, SHARD_LATENCY
from service.pb import datastore_pb2 as pb
from service.pb import datastore_pb2_grpc as pb_grpc
from service.server import SERVICE_NAME
from service.status import from_rpc_error

log = logging.getLogger(__name__)
#: True while the router works for an RPC's caller (set by the servicer): their key, or none,
#: is forwarded, never the router's own (which would lend a keyless caller its rights).
ON_BEHALF_OF_CALLER: contextvars.ContextVar[bool] = contextvars.ContextVar("on_behalf_of_caller", default=False)
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
#: Share of the caller's remaining time the router keeps for merging and answering, so a
#: shard that misses the deadline is reported (or fails the call) before the caller gives up.
DEADLINE_RESERVE = 0.1
DEADLINE_RESERVE_MAX_S = 0.05

HEDGES = Counter("datastore_router_hedged_calls_total", "Shard calls sent to a second replica (hedging)",
                 ["server"], registry=REGISTRY)
REPLICA_STALE = Gauge("datastore_router_replica_stale", "1 while a replica is stale (not read from)",
                      ["replica"], registry=REGISTRY)
REPLICA_HEALTHY = Gauge("datastore_router_replica_healthy", "1 while a replica answers health checks",
                        ["replica"], registry=REGISTRY)


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
    #: Reads only: when the first replica has not answered after this many ms, send the
    #: same call to the next replica too and take whichever answers first (None: off).
    hedge_after_ms: float | None = None
    #: Searches with the same options sent at once; requests arriving beyond that wait and
    #: go out together as one batched Search per server (0: never batch).
    batch_in_flight: int = 2

    def __post_init__(self) -> None:
        if not self.servers or any(not group for group in self.servers):
            raise ValueError("servers: give at least one server, each with at least one replica address")
        for name in ("per_shard_timeout", "default_deadline", "health_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.batch_in_flight < 0:
            raise ValueError(f"batch_in_flight must be >= 0, got {self.batch_in_flight}")
        if self.hedge_after_ms is not None and self.hedge_after_ms <= 0:
            raise ValueError(f"hedge_after_ms must be positive, got {self.hedge_after_ms}")


@dataclass
class _Replica:
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
class _Server:
    """One shard server and its replicas; `shards` learned from its Stats."""

    replicas: list[_Replica]
    shards: list[int] = field(default_factory=list)
    _turn: itertools.count = field(default_factory=itertools.count)
    #: Writes to this server, one at a time (set in the loop).
    write_lock: asyncio.Lock | None = None
    #: While a replica is stale: the writes sent since, with the write sequences before and
    #: after each, so a replica seeded meanwhile can be brought up to date (see _catch_up).
    log: collections.deque = field(default_factory=collections.deque)
    log_bytes: int = 0
    #: Write sequences of the in-sync replicas after the last logged write (None: unknown,
    #: the next write asks for them first).
    log_tail: dict[int, int] | None = None

    def reset_log(self) -> None:
        self.log.clear()
        self.log_bytes, self.log_tail = 0, None

    def order(self) -> list[_Replica]:
        """In-sync replicas to try, healthy first, rotating so load spreads over them."""
        n = next(self._turn) % len(self.replicas)
        rotated = [r for r in self.replicas[n:] + self.replicas[:n] if not r.stale]
        return [r for r in rotated if r.healthy] + [r for r in rotated if not r.healthy]

    @property
    def name(self) -> str:
        return ",".join(r.address for r in self.replicas)


@dataclass(frozen=True)
class _Logged:
    """One write to a server as its followers got it (Upsert: the items, with their ids)."""

    method: str
    request: Any
    before: dict[int, int]
    after: dict[int, int]
    size: int
    #: The caller's metadata (key) the write was made with: a replay has the same rights.
    md: tuple | None = None

    @property
    def touched(self) -> list[int]:
        return sorted(s for s, v in self.after.items() if v != self.before.get(s))

    def part(self, shards: set[int], num_shards: int):
        """The request restricted to the ids of `shards` (one shard of a write may be in a
        seeded copy while another is not); None for writes that cannot be split."""
        if self.method == "Upsert":
            items = [it for it in self.request if int(shard_of(it.passage.id, num_shards)) in shards]
            return items
        if self.method in ("Delete", "Grant", "Revoke"):
            out = type(self.request)()
            out.CopyFrom(self.request)
            del out.ids[:]
            out.ids.extend(i for i in self.request.ids if int(shard_of(i, num_shards)) in shards)
            return out
        return None


#: Bounds of a server's write log (it is kept only while one of its replicas is stale); a
#: replica whose copy is older than the log's start must be seeded again.
WRITE_LOG_MAX_ENTRIES = 20000
WRITE_LOG_MAX_BYTES = 128 * 1024 * 1024
#: Catching up replays the log without the write lock in up to this many rounds, until at
#: most CATCH_UP_LOCKED writes are left; those are sent under the lock (writes wait).
CATCH_UP_ROUNDS = 5
CATCH_UP_LOCKED = 16


@dataclass
class _Batch:
    """Searches with the same options waiting to go out together, and how many are out."""

    queue: list = field(default_factory=list)
    running: int = 0


class _Loop:
    """An asyncio event loop in a daemon thread; `run` waits for a coroutine from any other
    thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="router-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Awaitable, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()


def _fixed(request) -> Callable[[list[int] | None], object]:
    """A write request that is the same for every replica (only Upsert passes ids on)."""
    return lambda _ids: request


def _mark_stale(replica: _Replica, reason: str) -> None:
    if not replica.stale:
        log.error("replica %s is stale: %s; it is not read from until it is resynced "
                  "(restart it with --seed-from a live replica)", replica.address, reason)
    replica.stale, replica.reason = True, reason
    REPLICA_STALE.labels(replica.address).set(1)


def _stopped(replica: _Replica, why: str) -> None:
    reason = f"catching up stopped: {why}; resync it (--seed-from)"
    if replica.reason != reason:
        log.warning("replica %s: %s", replica.address, reason)
    replica.reason = reason


class Router:
    """Routes the Datastore API to shard servers (see module docstring)."""

    def __init__(self, config: RouterConfig, *, limits: Limits = Limits(),
                 encoder_factory: Callable[[str], Encoder] | None = None) -> None:
        self.config = config
        self.limits = limits
        self._loop = _Loop()
        self.servers: list[_Server] = self._loop.run(self._connect())
        self._encoder_factory = encoder_factory or (lambda name: Encoder(name))
        self._encoder: Encoder | None = None
        self._query_encoders: dict[str, Any] = {}  # compat models' encoders, by name
        self._encoder_lock = threading.Lock()
        self._on_health_change: list[Callable[[bool], None]] = []
        self._serving = True
        self._closed = False
        self._batches: dict[tuple, _Batch] = {}
        try:
            self._loop.run(self._discover())
        except BaseException:
            self.close()
            raise
        self._health_task = asyncio.run_coroutine_threadsafe(self._watch_health(), self._loop.loop)

    async def _connect(self) -> list[_Server]:
        opts = [("grpc.max_receive_message_length", self.config.max_message_bytes),
                ("grpc.max_send_message_length", self.config.max_message_bytes)]
        servers = []
        for group in self.config.servers:
            replicas = []
            for address in group:
                ch = grpc.aio.insecure_channel(address, options=opts)
                replicas.append(_Replica(address, ch, pb_grpc.DatastoreStub(ch), health_pb2_grpc.HealthStub(ch)))
                REPLICA_STALE.labels(address).set(1)
            servers.append(_Server(replicas, write_lock=asyncio.Lock()))
        return servers

    # -- topology, health and replica sync ------------------------------------------------------

    async def _replica_stats(self, replica: _Replica, timeout: float, digest: bool = False
                             ) -> pb.StatsResponse | None:
        try:
            return await replica.stub.Stats(pb.StatsRequest(with_digest=digest), timeout=timeout,
                                            metadata=self._own_md())
        except grpc.RpcError as e:
            if e.code() not in RETRYABLE:
                raise from_rpc_error(e) from None
            replica.healthy = False
            return None

    async def _discover(self) -> None:
        """Ask every replica which shards it holds (every shard must be held by exactly one
        server) and its write sequences: replicas at the highest sequences are in sync."""
        owner: dict[int, int] = {}
        first: pb.StatsResponse | None = None
        for n, server in enumerate(self.servers):
            answers = await asyncio.gather(*(self._replica_stats(r, self.config.default_deadline)
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
                    _mark_stale(r, f"its write sequences {r.seqs} are behind {dict(best)}")
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
        self._owner = owner
        self.num_shards = first.num_shards
        self.dim = first.dim
        self.manifest = Manifest.from_json(first.manifest_json, "the shard servers' manifest")

    async def _check(self, replica: _Replica) -> None:
        try:
            resp = await replica.health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                              timeout=self.config.health_interval)
            replica.healthy = resp.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            replica.healthy = False
        REPLICA_HEALTHY.labels(replica.address).set(int(replica.healthy))

    async def _verify(self, server: _Server, replica: _Replica) -> None:
        """Put a stale replica back into rotation once it holds what an in-sync replica
        holds: equal write sequences, then equal content digests (compared under the
        server's write lock, so no write lands in between)."""
        assert server.write_lock is not None
        for _ in range(CATCH_UP_ROUNDS):  # most of the missed writes first, while writes go on
            have = await self._seqs_of(replica) if server.log else None
            if have is None or (await self._catch_up(server, replica, have, list(server.log)) or 0) <= CATCH_UP_LOCKED:
                break
        async with server.write_lock:
            good = next((r for r in server.replicas if not r.stale and r.healthy), None)
            if good is None:
                return
            want = await self._replica_stats(good, self.config.health_interval * 2)
            have = await self._replica_stats(replica, self.config.health_interval * 2)
            if want is None or have is None:
                return
            want_seqs = {s.shard_id: s.write_seq for s in want.shards}
            got = {s.shard_id: s.write_seq for s in have.shards}
            if (got != want_seqs and server.log and server.log_tail == want_seqs  # the rest, no write between
                    and await self._catch_up(server, replica, got, list(server.log)) is not None):
                got = await self._seqs_of(replica) or got
            if got != want_seqs:
                why = replica.reason if replica.reason.startswith("catching up") else "resync it (--seed-from)"
                replica.reason = f"write sequences {got} differ from {good.address}'s {want_seqs}; {why}"
                return
            tried = (good.address, want.instance_id, have.instance_id, tuple(sorted(got.items())))
            if replica.digest_checked == tried:
                return  # same sequences as last time: the content was compared then
            replica.digest_checked = tried
            slow = max(self.config.per_shard_timeout, 10 * self.config.health_interval)
            want = await self._replica_stats(good, slow, digest=True)
            have = await self._replica_stats(replica, slow, digest=True)
            if want is None or have is None:
                replica.digest_checked = None
                return
            if {s.shard_id: s.digest for s in have.shards} != {s.shard_id: s.digest for s in want.shards}:
                replica.reason = (f"same write sequences as {good.address} but different data; "
                                  "resync it (--seed-from)")
                log.error("replica %s: %s", replica.address, replica.reason)
                return
            replica.stale, replica.reason, replica.seqs, replica.digest_checked = False, "", got, None
            REPLICA_STALE.labels(replica.address).set(0)
            log.warning("replica %s is in sync again (write sequences %s, same data as %s): reading from it",
                        replica.address, got, good.address)

    async def _catch_up(self, server: _Server, replica: _Replica, have: dict[int, int],
                        entries: list[_Logged]) -> int | None:
        """Send a stale replica the logged writes its shards lack, in order: for each write
        and each shard it changed, the replica has it when its sequence is at the write's
        `after`, lacks it when at `before` (then it gets the write, cut to the shards that
        lack it); anything else (an older copy than the log, a tenant change) stops it.
        The number of writes sent, None when it stopped; _verify then compares sequences
        and content as for any replica, so a wrong replay only leaves it stale."""
        cur, sent = dict(have), 0
        for e in entries:
            need: set[int] = set()
            for s in e.touched:
                c = cur.get(s)
                if c is None or e.after[s] <= c:
                    continue
                if c != e.before.get(s):
                    return _stopped(replica, f"shard {s} is at write {c}, the router's write log holds "
                                             f"writes from {e.before.get(s)}")
                need.add(s)
            if not need:
                continue
            if e.method not in ("Upsert", "Delete", "Grant", "Revoke"):
                return _stopped(replica, f"it missed a {e.method}")
            part = e.request if need == set(e.touched) else e.part(need, self.num_shards)
            if e.method == "Upsert" and not part or e.method != "Upsert" and not part.ids:
                return _stopped(replica, "a logged write changed shards its ids are not on")
            try:
                await getattr(replica.stub, e.method)(iter(part) if e.method == "Upsert" else part,
                                                      timeout=self.config.per_shard_timeout, metadata=e.md)
            except grpc.RpcError as err:
                SHARD_ERRORS.labels(replica.address, e.method, err.code().name).inc()
                return _stopped(replica, f"a replayed {e.method} failed ({err.code().name}: {err.details()})")
            for s in need:
                cur[s] = e.after[s]
            sent += 1
        if sent:
            log.warning("replica %s: sent it %d writes its copy lacked, from the router's write log",
                        replica.address, sent)
        return sent

    async def _watch_health(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval)
            try:
                await asyncio.gather(*(self._check(r) for s in self.servers for r in s.replicas))
                await asyncio.gather(*(self._verify(s, r) for s in self.servers for r in s.replicas
                                       if r.stale and r.healthy))
            except Exception:  # the watcher must outlive any one bad round
                log.exception("health round failed")
            now = self.config.partial_results or all(
                any(r.healthy and not r.stale for r in s.replicas) for s in self.servers)
            if now != self._serving:
                self._serving = now
                for fn in self._on_health_change:
                    fn(now)

    def on_health_change(self, fn: Callable[[bool], None]) -> None:
        """Call fn(serving) whenever the router's own health flips (every server has a
        healthy in-sync replica)."""
        self._on_health_change.append(fn)

    def replica_status(self) -> list[pb.ReplicaStatus]:
        return [pb.ReplicaStatus(address=r.address, shard_ids=s.shards, healthy=r.healthy, stale=r.stale,
                                 reason=r.reason) for s in self.servers for r in s.replicas]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        task = getattr(self, "_health_task", None)
        if task is not None:
            task.cancel()

        async def shut() -> None:
            for server in self.servers:
                for r in server.replicas:
                    await r.channel.close()

        try:
            self._loop.run(shut(), timeout=5)
        finally:
            self._loop.stop()

    # -- calls ----------------------------------------------------------------------------------

    def _own_md(self) -> tuple | None:
        key = self.config.api_key
        return (("authorization", f"Bearer {key}"),) if key else None

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

    async def _try(self, replica: _Replica, method: str, request, deadline: float, md: tuple | None):
        left = deadline - asyncio.get_running_loop().time()
        t = time.perf_counter()
        try:
            out = await getattr(replica.stub, method)(request, timeout=max(0.001, min(left,
                                                      self.config.per_shard_timeout)), metadata=md)
        except grpc.RpcError as e:
            SHARD_ERRORS.labels(replica.address, method, e.code().name).inc()
            raise
        SHARD_LATENCY.labels(replica.address, method).observe(time.perf_counter() - t)
        return out

    async def _call(self, server: _Server, method: str, request, deadline: float, md: tuple | None,
                    hedge: bool = False):
        """Call one replica after another until one answers or the deadline passes; with
        `hedge`, also start the next replica when the first is slower than hedge_after_ms."""
        loop = asyncio.get_running_loop()
        candidates = iter(server.order())
        pending: set[asyncio.Task] = set()
        last: grpc.RpcError | None = None
        hedge_after = self.config.hedge_after_ms / 1e3 if hedge and self.config.hedge_after_ms else None
        tried = 0

        def start() -> bool:
            nonlocal tried
            replica = next(candidates, None)
            if replica is None:
                return False
            task = asyncio.ensure_future(self._try(replica, method, request, deadline, md))
            task.replica = replica  # type: ignore[attr-defined]
            pending.add(task)
            tried += 1
            return True

        try:
            if not start():
                raise Unavailable(f"shard server {server.name} (shards {server.shards}) has no in-sync replica",
                                  hint="resync its stale replicas (datastore serve ... --seed-from ADDR)")
            while pending:
                left = deadline - loop.time()
                if left <= 0:
                    break
                wait = min(left, hedge_after) if hedge_after is not None and tried == 1 else left
                done, _ = await asyncio.wait(pending, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    if hedge_after is not None and tried == 1 and start():
                        HEDGES.labels(server.name).inc()
                    continue
                for task in done:
                    pending.discard(task)
                    e = task.exception()
                    if e is None:
                        return task.result()
                    if not isinstance(e, grpc.RpcError):
                        raise e
                    if e.code() not in RETRYABLE:
                        raise from_rpc_error(e) from None
                    if e.code() == grpc.StatusCode.UNAVAILABLE:
                        task.replica.healthy = False  # type: ignore[attr-defined]
                    last = e
                    if not pending:
                        start()
        finally:
            for task in pending:
                task.cancel()
        if loop.time() >= deadline and (last is None or last.code() == grpc.StatusCode.DEADLINE_EXCEEDED):
            raise DeadlineExceeded(f"shard server {server.name} (shards {server.shards}) did not answer "
                                   "within the deadline")
        raise Unavailable(f"shard server {server.name} (shards {server.shards}) did not answer"
                          + (f": {last.details()}" if last is not None else ""),
                          hint="check the shard servers; the router retries other replicas")

    async def _gather(self, method: str, requests: dict[int, object], deadline: float, md: tuple | None,
                      hedge: bool) -> dict[int, object]:
        """Call servers (by position) at once; a DatastoreError in place of a failed answer."""
        async def one(n: int):
            try:
                return await self._call(self.servers[n], method, requests[n], deadline, md, hedge)
            except DatastoreError as e:
                return e

        keys = list(requests)
        return dict(zip(keys, await asyncio.gather(*(one(n) for n in keys))))

    def _fan_out(self, method: str, requests: dict[int, object], timeout: float | None,
                 hedge: bool = False) -> dict[int, object]:
        # md is read here, in the caller's thread: the loop does not see its context variables
        return self._loop.run(self._gather(method, requests, self._deadline(timeout), self._md(), hedge))

    async def _batched_search(self, request: pb.SearchRequest, queries: list[pb.Query], deadline: float,
                              md: tuple | None) -> dict[int, object]:
        """One request's answers per server: (its query results, missing shards) or an error.

        Requests with the same options (and key) that arrive while `batch_in_flight` such
        searches are already out go together as one Search per server when one returns: at
        low load nothing waits, under load the per-call cost (gRPC on both sides, one index
        scan per query) is shared by the batch."""
        key = (request.SerializeToString(deterministic=True), md)
        batch = self._batches.get(key)
        if batch is None:
            batch = self._batches[key] = _Batch()
        waiter = asyncio.get_running_loop().create_future()
        batch.queue.append((queries, deadline, waiter))
        if batch.running < self.config.batch_in_flight:
            batch.running += 1
            asyncio.ensure_future(self._drain(key, batch, request, md))
        return await waiter

    async def _drain(self, key, batch: _Batch, request: pb.SearchRequest, md: tuple | None) -> None:
        try:
            while batch.queue:
                members, size = [], 0
                while batch.queue and (not members or size + len(batch.queue[0][0]) <= self.limits.max_batch):
                    members.append(batch.queue.pop(0))
                    size += len(members[-1][0])
                try:
                    await self._search_members(request, members, md)
                except BaseException as e:  # never leave a caller waiting
                    for _, _, waiter in members:
                        if not waiter.done():
                            waiter.set_exception(e)
                    if not isinstance(e, Exception):
                        raise
        finally:
            batch.running -= 1
            if not batch.running and not batch.queue:
                self._batches.pop(key, None)

    async def _search_members(self, request: pb.SearchRequest, members: list, md: tuple | None) -> None:
        merged = pb.SearchRequest()
        merged.CopyFrom(request)
        for queries, _, _ in members:
            merged.queries.extend(queries)
        # the batch ends with its earliest member (a caller must not wait past its deadline)
        deadline = min(d for _, d, _ in members)
        answers = await self._gather("Search", {n: merged for n in range(len(self.servers))}, deadline, md, True)
        bad = [a for a in answers.values() if isinstance(a, DatastoreError)
               and not isinstance(a, (Unavailable, DeadlineExceeded))]
        if bad and len(members) > 1:  # one member's fault (say a bad filter): answer each alone
            await asyncio.gather(*(self._search_members(request, [m], md) for m in members))
            return
        start = 0
        for queries, _, waiter in members:
            end = start + len(queries)
            if not waiter.done():
                waiter.set_result({n: a if isinstance(a, DatastoreError) else (a.results[start:end], a.missing_shards)
                                   for n, a in answers.items()})
            start = end

    # -- the Datastore API ------------------------------------------------------------------------

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
            answers = self._loop.run(self._batched_search(request, queries_pb, deadline, md))
        else:
            request.queries.extend(queries_pb)
            answers = {n: a if isinstance(a, DatastoreError) else (a.results, a.missing_shards) for n, a in
                       self._loop.run(self._gather("Search", {n: request for n in range(len(self.servers))},
                                                   deadline, md, True)).items()}
        parts, hits_of, missing = [], [], []
        for n, answer in answers.items():
            if isinstance(answer, (Unavailable, DeadlineExceeded)) and self.config.partial_results:
                missing += self.servers[n].shards
                continue
            if isinstance(answer, DatastoreError):
                raise answer
            results, shard_missing = answer
            missing += list(shard_missing)
            ids = np.full((len(vectors), k), MISSING_ID, np.int64)
            scores = np.full((len(vectors), k), -np.inf, np.float32)
            for q, row in enumerate(results):
                m = min(len(row.hits), k)
                if m:
                    ids[q, :m] = [h.id for h in row.hits[:m]]
                    scores[q, :m] = [h.score for h in row.hits[:m]]
            parts.append(SearchResult(ids, scores))
            hits_of.append(results)
        if not parts:
            raise Unavailable(f"no shard server answered (shards {sorted(missing)} missing)")
        # merge on arrays, then turn only the winners' passages into Passage objects
        merged = merge_topk(parts, k)
        where: dict[int, tuple[int, int]] = {}
        rows = []
        for q in range(merged.num_queries):
            where.clear()
            for part, results in enumerate(hits_of):
                for j, h in enumerate(results[q].hits[:k]):
                    where[h.id] = (part, j)
            row = []
            for pid, score in merged.row(q):
                part, j = where[pid]
                h = hits_of[part][q].hits[j]
                row.append(Hit(pid, score, convert.passage_from_pb(h.passage) if h.HasField("passage") else None))
            rows.append(row)
        return rows, sorted(missing)

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
        check_ids(ids)
        ids = [int(i) for i in ids]
        groups = self._by_server(ids)
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

    # -- writes ---------------------------------------------------------------------------------

    async def _replicate(self, server: _Server, method: str, request: Callable[[list[int] | None], object],
                         deadline: float, md: tuple | None):
        """A write to every in-sync replica of a server, one write at a time per server: the
        first that answers (the primary) assigns new ids, the others then get the same ids
        in parallel; the answer is the primary's. A replica that does not acknowledge a
        write the primary acknowledged is marked stale (not read until resynced).

        While a replica of the server is stale, each write is also logged with the write
        sequences before and after it (one Stats call to the primary), so a replica seeded
        meanwhile can be given the writes its copy lacks (_catch_up)."""
        assert server.write_lock is not None
        async with server.write_lock:
            logging_on = any(r.stale for r in server.replicas)
            before = None
            if not logging_on:
                if server.log or server.log_tail is not None:
                    server.reset_log()
            else:
                if server.log_tail is None:
                    server.reset_log()  # a gap: what was logged before it can not be continued
                    server.log_tail = await self._seqs_now(server)
                before = server.log_tail
            try:
                answer, primary, ids = await self._apply(server, method, request, deadline, md)
            except DatastoreError as e:
                # refused by a replica that answered (a bad request): the log goes on if it
                # changed nothing; otherwise (or when no replica answered) it can not say
                if before is not None and (isinstance(e, Unavailable) or await self._seqs_now(server) != before):
                    server.reset_log()
                raise
            except BaseException:
                server.reset_log()
                raise
            if before is not None:
                after = await self._seqs_of(primary)
                if after is None or any(after.get(s, 0) < v for s, v in before.items()):
                    server.reset_log()
                else:
                    if method == "Upsert":
                        logged = list(request(ids))
                        size = sum(item.ByteSize() for item in logged)
                    else:
                        logged = request(None)
                        size = logged.ByteSize()
                    server.log.append(_Logged(method, logged, before, after, size, md))
                    server.log_bytes += size
                    server.log_tail = after
                    while server.log and (len(server.log) > WRITE_LOG_MAX_ENTRIES
                                          or server.log_bytes > WRITE_LOG_MAX_BYTES):
                        server.log_bytes -= server.log.popleft().size
            return answer

    async def _seqs_of(self, replica: _Replica) -> dict[int, int] | None:
        """A replica's write sequences, or None when it does not say (down, refused...)."""
        try:
            stats = await self._replica_stats(replica, self.config.per_shard_timeout)
        except DatastoreError:
            return None
        return None if stats is None else {s.shard_id: s.write_seq for s in stats.shards}

    async def _seqs_now(self, server: _Server) -> dict[int, int] | None:
        """The write sequences of the server's in-sync replicas (equal while no write is
        in flight: call under its write lock)."""
        for replica in server.order():
            seqs = await self._seqs_of(replica)
            if seqs is not None:
                return seqs
        return None

    async def _apply(self, server: _Server, method: str, request: Callable[[list[int] | None], object],
                     deadline: float, md: tuple | None) -> tuple[Any, _Replica, list[int] | None]:
        """One write to the primary, then to the other in-sync replicas (see _replicate)."""
        loop = asyncio.get_running_loop()
        answer, primary, failed = None, None, []
        for replica in server.order():
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                answer = await getattr(replica.stub, method)(request(None), timeout=min(
                    left, self.config.per_shard_timeout), metadata=md)
                primary = replica
                break
            except grpc.RpcError as e:
                SHARD_ERRORS.labels(replica.address, method, e.code().name).inc()
                if e.code() not in RETRYABLE:
                    raise from_rpc_error(e) from None
                # it may or may not have applied the write: it is out of sync if another takes it
                failed.append((replica, e.code().name))
        if primary is None:
            if failed:
                log.warning("%s failed on every replica of %s; a replica that timed out may still have "
                            "applied it", method, server.name)
            raise Unavailable(f"no in-sync replica of shard server {server.name} took the {method}",
                              hint="check the shard servers; resync stale replicas with --seed-from")
        for replica, code in failed:
            _mark_stale(replica, f"missed a {method} ({code})")
        ids = list(answer.ids) if method == "Upsert" else None

        async def follow(replica: _Replica) -> None:
            try:
                await getattr(replica.stub, method)(request(ids), timeout=max(0.001, min(
                    deadline - loop.time(), self.config.per_shard_timeout)), metadata=md)
            except grpc.RpcError as e:
                SHARD_ERRORS.labels(replica.address, method, e.code().name).inc()
                if e.code() in RETRYABLE:
                    replica.healthy = False
                _mark_stale(replica, f"missed a {method} ({e.code().name})")

        await asyncio.gather(*(follow(r) for r in server.replicas if r is not primary and not r.stale))
        return answer, primary, ids

    def _write(self, server: int, method: str, request: Callable[[list[int] | None], object],
               timeout: float | None, md: tuple | None):
        return self._loop.run(self._replicate(self.servers[server], method, request, self._deadline(timeout), md))

    def _write_each(self, calls: dict[int, tuple[str, Callable]], timeout: float | None) -> dict[int, object]:
        """Writes to several servers at once; the first error is raised once all finished."""
        md, deadline = self._md(), self._deadline(timeout)

        async def run():
            async def one(n, method, request):
                try:
                    return await self._replicate(self.servers[n], method, request, deadline, md)
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
        for n, pos in self._by_server([passages[i].id for i in known]).items():
            groups.setdefault(n, []).extend(known[p] for p in pos)
        for j, n in enumerate(i for i, p in enumerate(passages) if p.id < 0):
            groups.setdefault(j % len(self.servers), []).append(n)

        def items_for(pos: list[int]) -> Callable[[list[int] | None], object]:
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
        calls = {n: ("Delete", _fixed(pb.DeleteRequest(ids=[ids[p] for p in pos])))
                 for n, pos in self._by_server(ids).items()}
        return sum(a.deleted for a in self._write_each(calls, timeout).values())

    def _every_server(self, method: str, request) -> list:
        """A control write (tenants) to every replica of every server."""
        calls = {n: (method, _fixed(request)) for n in range(len(self.servers))}
        return list(self._write_each(calls, None).values())

    def create_tenant(self, name: str) -> None:
        self._every_server("CreateTenant", pb.CreateTenantRequest(name=name))

    def drop_tenant(self, name: str) -> tuple[int, int]:
        answers = self._every_server("DropTenant", pb.DropTenantRequest(name=name))
        return sum(a.deleted_passages for a in answers), sum(a.updated_passages for a in answers)

    def list_tenants(self) -> list[str]:
        answer = self._fan_out("ListTenants", {0: pb.ListTenantsRequest()}, None)[0]
        if isinstance(answer, DatastoreError):
            raise answer
        return list(answer.names)

    def grant(self, ids: Sequence[int], tenant: str) -> int:
        return self._access("Grant", ids, tenant)

    def revoke(self, ids: Sequence[int], tenant: str) -> int:
        return self._access("Revoke", ids, tenant)

    def _access(self, method: str, ids: Sequence[int], tenant: str) -> int:
        if len(ids) == 0:
            raise InvalidArgument.field("ids", "no ids given")
        check_ids(ids)
        ids = [int(i) for i in ids]
        calls = {n: (method, _fixed(pb.AccessRequest(ids=[ids[p] for p in pos], tenant=tenant)))
                 for n, pos in self._by_server(ids).items()}
        return sum(a.changed for a in self._write_each(calls, None).values())

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


__all__ = ["Router", "RouterConfig"]
