"""Reads fanned out to one replica of every shard server, and their answers merged.

Each shard call goes to one in-sync replica; on UNAVAILABLE or a missed per-shard deadline
(within the caller's deadline) the next replica is tried, and with `hedge_after_ms` a slow
call is also sent to a second replica, the first answer winning. Searches with the same
options that arrive while `batch_in_flight` of them are out are sent together as one
batched Search per server: nothing waits at low load, and under load the per-call cost
(gRPC on both sides, one scan per call) is shared. Per-server top-k are merged with the
same merge as the embedded store.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import grpc
import numpy as np
from prometheus_client import Counter

from datastore.errors import DatastoreError, DeadlineExceeded, Unavailable
from datastore.records import Hit
from datastore.sharding import merge_topk
from datastore.store import Limits
from index import SearchResult
from index.base import MISSING_ID
from service import convert
from service.metrics import REGISTRY, SHARD_ERRORS, SHARD_LATENCY
from service.pb import datastore_pb2 as pb
from service.routing.config import RETRYABLE
from service.routing.topology import Replica, Server, Topology
from service.status import from_rpc_error

HEDGES = Counter("datastore_router_hedged_calls_total", "Shard calls sent to a second replica (hedging)",
                 ["server"], registry=REGISTRY)


@dataclass
class Batch:
    """Searches with the same options waiting to go out together, and how many are out."""

    queue: list = field(default_factory=list)
    running: int = 0


class FanOut:
    """Calls to the shard servers for reads, with retries, hedging and search batching
    (coroutines here run in the router's loop)."""

    def __init__(self, topology: Topology, limits: Limits) -> None:
        self.topology = topology
        self.config = topology.config
        self.limits = limits
        self._batches: dict[tuple, Batch] = {}

    async def _try(self, replica: Replica, method: str, request, deadline: float, md: tuple | None):
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

    async def call(self, server: Server, method: str, request, deadline: float, md: tuple | None,
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

    async def gather(self, method: str, requests: dict[int, object], deadline: float, md: tuple | None,
                     hedge: bool) -> dict[int, object]:
        """Call servers (by position) at once; a DatastoreError in place of a failed answer."""
        async def one(n: int):
            try:
                return await self.call(self.topology.servers[n], method, requests[n], deadline, md, hedge)
            except DatastoreError as e:
                return e

        keys = list(requests)
        return dict(zip(keys, await asyncio.gather(*(one(n) for n in keys))))

    async def batched_search(self, request: pb.SearchRequest, queries: list[pb.Query], deadline: float,
                             md: tuple | None) -> dict[int, object]:
        """One request's answers per server: (its query results, missing shards) or an error.

        Requests with the same options (and key) that arrive while `batch_in_flight` such
        searches are already out go together as one Search per server when one returns: at
        low load nothing waits, under load the per-call cost (gRPC on both sides, one index
        scan per query) is shared by the batch."""
        key = (request.SerializeToString(deterministic=True), md)
        batch = self._batches.get(key)
        if batch is None:
            batch = self._batches[key] = Batch()
        waiter = asyncio.get_running_loop().create_future()
        batch.queue.append((queries, deadline, waiter))
        if batch.running < self.config.batch_in_flight:
            batch.running += 1
            asyncio.ensure_future(self._drain(key, batch, request, md))
        return await waiter

    async def _drain(self, key, batch: Batch, request: pb.SearchRequest, md: tuple | None) -> None:
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
        answers = await self.gather("Search", {n: merged for n in range(len(self.topology.servers))},
                                    deadline, md, True)
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


def merge_search(answers: dict[int, object], servers: list[Server], num_queries: int, k: int,
                 partial_results: bool) -> tuple[list[list[Hit]], list[int]]:
    """Per-server answers ((results, missing shards) or an error) merged into each query's
    top-k hits and the sorted missing shards; with `partial_results` an unreachable server's
    shards count as missing instead of failing the search."""
    parts, hits_of, missing = [], [], []
    for n, answer in answers.items():
        if isinstance(answer, (Unavailable, DeadlineExceeded)) and partial_results:
            missing += servers[n].shards
            continue
        if isinstance(answer, DatastoreError):
            raise answer
        results, shard_missing = answer
        missing += list(shard_missing)
        ids = np.full((num_queries, k), MISSING_ID, np.int64)
        scores = np.full((num_queries, k), -np.inf, np.float32)
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
