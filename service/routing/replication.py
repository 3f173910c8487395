"""Writes to every in-sync replica, and bringing stale replicas back in sync.

Writes go to every in-sync replica of a server, one write at a time per server (so
replicas apply them in the same order), the first answering replica (the primary)
assigning new ids. A replica that misses an acknowledged write is marked stale and no
longer read; a replica is also stale until verified in sync (at start, or when it comes
back): its per-shard write sequences (Stats.write_seq) and then content digests must equal
an in-sync replica's (writes are deterministic given the same state and order, so a write
retried on another replica after a timeout gives the same ids).

`datastore serve ... --seed-from ADDR` copies the shards from a live replica, after which
the health loop verifies it and puts it back into rotation. Writes go on meanwhile, so the
copy is behind by the time it serves: while a replica of a server is stale the router logs
that server's writes (bounded, in memory) with the write sequences before and after each
(one extra Stats call per write, only then), and catches a replica up by sending it the
logged writes its copy lacks, per shard and in order (most of them while writes go on, the
last few under the write lock), before comparing sequences and digests as above; a copy
older than the log, or a missed tenant change, still needs a new --seed-from.

Limits: this holds for writes through one router (several writing routers can order
writes differently); staleness is kept in the router's memory, and a restarted router takes
the replicas at the highest write sequences it can reach as in sync; a write that failed
on every replica may still have been applied by one that timed out.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from datastore.errors import DatastoreError, Unavailable
from datastore.sharding import shard_of
from service.metrics import SHARD_ERRORS
from service.routing.config import RETRYABLE, lost_call
from service.routing.topology import REPLICA_STALE, Replica, Server, Topology, mark_stale
from service.status import from_rpc_error

log = logging.getLogger("service.router")  # see topology.py

#: Bounds of a server's write log (it is kept only while one of its replicas is stale); a
#: replica whose copy is older than the log's start must be seeded again.
WRITE_LOG_MAX_ENTRIES = 20000
WRITE_LOG_MAX_BYTES = 128 * 1024 * 1024
#: Catching up replays the log without the write lock in up to this many rounds, until at
#: most CATCH_UP_LOCKED writes are left; those are sent under the lock (writes wait).
CATCH_UP_ROUNDS = 5
CATCH_UP_LOCKED = 16

#: A write request for a replica, given the ids the primary assigned (None: for the
#: primary itself); only Upsert passes ids on.
WriteRequest = Callable[[list[int] | None], object]


@dataclass(frozen=True)
class Logged:
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


def fixed(request) -> WriteRequest:
    """A write request that is the same for every replica (only Upsert passes ids on)."""
    return lambda _ids: request


def _stopped(replica: Replica, why: str) -> None:
    reason = f"catching up stopped: {why}; resync it (--seed-from)"
    if replica.reason != reason:
        log.warning("replica %s: %s", replica.address, reason)
    replica.reason = reason


class Replication:
    """Writes through the write lock of each server, the write log, and resyncing stale
    replicas (coroutines here run in the router's loop)."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.config = topology.config

    async def seqs_of(self, replica: Replica) -> dict[int, int] | None:
        """A replica's write sequences, or None when it does not say (down, refused...)."""
        try:
            stats = await self.topology.replica_stats(replica, self.config.per_shard_timeout)
        except DatastoreError:
            return None
        return None if stats is None else {s.shard_id: s.write_seq for s in stats.shards}

    async def seqs_now(self, server: Server) -> dict[int, int] | None:
        """The write sequences of the server's in-sync replicas (equal while no write is
        in flight: call under its write lock)."""
        for replica in server.order():
            seqs = await self.seqs_of(replica)
            if seqs is not None:
                return seqs
        return None

    async def replicate(self, server: Server, method: str, request: WriteRequest,
                        deadline: float, md: tuple | None):
        """A write to every in-sync replica of a server, one write at a time per server: the
        first that answers (the primary) assigns new ids, the others then get the same ids
        in parallel; the answer is the primary's. A replica that does not acknowledge a
        write the primary acknowledged is marked stale (not read until resynced).

        While a replica of the server is stale, each write is also logged with the write
        sequences before and after it (one Stats call to the primary), so a replica seeded
        meanwhile can be given the writes its copy lacks (catch_up)."""
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
                    server.log_tail = await self.seqs_now(server)
                before = server.log_tail
            try:
                answer, primary, ids = await self.apply(server, method, request, deadline, md)
            except DatastoreError as e:
                # refused by a replica that answered (a bad request): the log goes on if it
                # changed nothing; otherwise (or when no replica answered) it can not say
                if before is not None and (isinstance(e, Unavailable) or await self.seqs_now(server) != before):
                    server.reset_log()
                raise
            except BaseException:
                server.reset_log()
                raise
            if before is not None:
                after = await self.seqs_of(primary)
                if after is None or any(after.get(s, 0) < v for s, v in before.items()):
                    server.reset_log()
                else:
                    if method == "Upsert":
                        logged = list(request(ids))
                        size = sum(item.ByteSize() for item in logged)
                    else:
                        logged = request(None)
                        size = logged.ByteSize()
                    server.log.append(Logged(method, logged, before, after, size, md))
                    server.log_bytes += size
                    server.log_tail = after
                    while server.log and (len(server.log) > WRITE_LOG_MAX_ENTRIES
                                          or server.log_bytes > WRITE_LOG_MAX_BYTES):
                        server.log_bytes -= server.log.popleft().size
            return answer

    async def apply(self, server: Server, method: str, request: WriteRequest,
                    deadline: float, md: tuple | None) -> tuple[Any, Replica, list[int] | None]:
        """One write to the primary, then to the other in-sync replicas (see replicate)."""
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
                if not lost_call(e):
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
            mark_stale(replica, f"missed a {method} ({code})")
        ids = list(answer.ids) if method == "Upsert" else None

        async def follow(replica: Replica) -> None:
            try:
                await getattr(replica.stub, method)(request(ids), timeout=max(0.001, min(
                    deadline - loop.time(), self.config.per_shard_timeout)), metadata=md)
            except grpc.RpcError as e:
                SHARD_ERRORS.labels(replica.address, method, e.code().name).inc()
                if e.code() in RETRYABLE:
                    replica.healthy = False
                mark_stale(replica, f"missed a {method} ({e.code().name})")

        await asyncio.gather(*(follow(r) for r in server.replicas if r is not primary and not r.stale))
        return answer, primary, ids

    async def verify(self, server: Server, replica: Replica) -> None:
        """Put a stale replica back into rotation once it holds what an in-sync replica
        holds: equal write sequences, then equal content digests (compared under the
        server's write lock, so no write lands in between)."""
        assert server.write_lock is not None
        for _ in range(CATCH_UP_ROUNDS):  # most of the missed writes first, while writes go on
            have = await self.seqs_of(replica) if server.log else None
            if have is None or (await self.catch_up(server, replica, have, list(server.log)) or 0) <= CATCH_UP_LOCKED:
                break
        async with server.write_lock:
            good = next((r for r in server.replicas if not r.stale and r.healthy), None)
            if good is None:
                return
            want = await self.topology.replica_stats(good, self.config.health_interval * 2)
            have = await self.topology.replica_stats(replica, self.config.health_interval * 2)
            if want is None or have is None:
                return
            want_seqs = {s.shard_id: s.write_seq for s in want.shards}
            got = {s.shard_id: s.write_seq for s in have.shards}
            if (got != want_seqs and server.log and server.log_tail == want_seqs  # the rest, no write between
                    and await self.catch_up(server, replica, got, list(server.log)) is not None):
                got = await self.seqs_of(replica) or got
            if got != want_seqs:
                why = replica.reason if replica.reason.startswith("catching up") else "resync it (--seed-from)"
                replica.reason = f"write sequences {got} differ from {good.address}'s {want_seqs}; {why}"
                return
            tried = (good.address, want.instance_id, have.instance_id, tuple(sorted(got.items())))
            if replica.digest_checked == tried:
                return  # same sequences as last time: the content was compared then
            replica.digest_checked = tried
            slow = max(self.config.per_shard_timeout, 10 * self.config.health_interval)
            want = await self.topology.replica_stats(good, slow, digest=True)
            have = await self.topology.replica_stats(replica, slow, digest=True)
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

    async def catch_up(self, server: Server, replica: Replica, have: dict[int, int],
                       entries: list[Logged]) -> int | None:
        """Send a stale replica the logged writes its shards lack, in order: for each write
        and each shard it changed, the replica has it when its sequence is at the write's
        `after`, lacks it when at `before` (then it gets the write, cut to the shards that
        lack it); anything else (an older copy than the log, a tenant change) stops it.
        The number of writes sent, None when it stopped; verify then compares sequences
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
            part = e.request if need == set(e.touched) else e.part(need, self.topology.num_shards)
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
