"""Shard servers as subprocesses on loopback plus a router: same answers as the embedded
store, replica failover without failed requests, the all-replicas-down policy, callers' keys
forwarded, stale replicas kept out of reads until resynced (--seed-from), deadlines,
per-shard timeouts and hedging."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from datastore.build import BuildConfig, build
from datastore.dedup import DedupConfig
from datastore.errors import InvalidArgument, NotFound, Unavailable
from datastore.records import Passage
from datastore.store import open_datastore
from service.client import DatastoreClient
from service.router import Router, RouterConfig
from service.server import ServerConfig, create_server, stop_server

ROOT = Path(__file__).resolve().parents[1]
DIM = 24


def _vectors(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def datastore_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sharded")
    np.save(d / "v.npy", _vectors(2000, 0))
    (d / "p.jsonl").write_text("".join(f'{{"text": "passage {i}", "title": "T{i}"}}\n' for i in range(2000)))
    build(BuildConfig([str(d / "p.jsonl")], d / "ds", embeddings=d / "v.npy", shards=4, vector_dtype="float32",
                      dedup=DedupConfig(near=False), progress=False))
    return d / "ds"


class ShardServer:
    """`datastore serve DIR --shards ...` in a subprocess on loopback (port 0: a free one)."""

    def __init__(self, directory: Path, shards: str, port: int = 0, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "datastore.cli", "serve", str(directory), "--shards", shards, "--port", str(port),
             *extra], env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE, text=True)
        lines = []
        while True:
            line = self.proc.stderr.readline()
            lines.append(line)
            match = re.search(r"serving .* on ([\d.]+:\d+)", line)
            if match or not line:
                break
        assert match, "".join(lines) + self.proc.stderr.read()
        self.address = match.group(1)
        self.port = int(self.address.rsplit(":", 1)[1])

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@pytest.fixture
def cluster(datastore_dir):
    """Server A (shards 0,1) with two replicas, server B (shards 2,3) with one."""
    servers = {"a1": ShardServer(datastore_dir, "0,1"), "a2": ShardServer(datastore_dir, "0,1"),
               "b1": ShardServer(datastore_dir, "2,3")}
    yield servers
    for s in servers.values():
        s.stop()


def _router(cluster, partial: bool = False):
    router = Router(RouterConfig([[cluster["a1"].address, cluster["a2"].address], [cluster["b1"].address]],
                                 partial_results=partial, per_shard_timeout=2.0, health_interval=0.2))
    config = ServerConfig(max_workers=8, grace_seconds=0.2)
    server, port = create_server(router, "127.0.0.1:0", config)
    return router, server, config, DatastoreClient(f"127.0.0.1:{port}", timeout=10), port


def test_router_answers_like_the_embedded_store(cluster, datastore_dir):
    router, server, config, client, _ = _router(cluster)
    try:
        queries = _vectors(20, 1)
        routed = client.search(list(queries), k=10, include_text=False)
        with open_datastore(datastore_dir) as ds:
            local = ds.search_vectors(queries, 10)
        assert [[h.id for h in row] for row in routed] == local.ids.tolist()
        np.testing.assert_allclose([[h.score for h in row] for row in routed], local.scores, rtol=1e-5)
        assert all(h.title for row in routed for h in row)
        st = client.stats()
        assert st.passages == 2000 and [s["shard_id"] for s in st.shards] == [0, 1, 2, 3]
        got = client.get_passages([5, 1500, 77])
        assert [p.text for p in got] == ["passage 5", "passage 1500", "passage 77"]
        with pytest.raises(NotFound):
            client.get_passages([5, 10**9])
        with pytest.raises(InvalidArgument):
            client.search([np.ones(DIM + 1, np.float32)], k=3)
    finally:
        client.close()
        stop_server(server, config)
        router.close()


def test_upsert_and_delete_through_the_router(cluster):
    router, server, config, client, _ = _router(cluster)
    try:
        v = _vectors(6, 7)
        ids = client.upsert([Passage(-1, f"new {i}") for i in range(6)], v)
        assert len(set(ids)) == 6 and min(ids) >= 2000  # fresh ids, spread over both servers
        found = client.search(list(v), k=1, include_text=True)
        assert [row[0].id for row in found] == ids
        assert client.delete(ids[:3]) == 3
        after = client.search(list(v[:3]), k=1)
        assert all(row[0].id not in ids[:3] for row in after)
    finally:
        client.close()
        stop_server(server, config)
        router.close()


def test_killing_a_replica_mid_load_fails_no_request(cluster):
    router, server, config, client, _ = _router(cluster)
    failures, done = [], []
    queries = list(_vectors(8, 3))

    def load() -> None:
        for _ in range(60):
            try:
                client.search(queries, k=5)
                done.append(1)
            except Exception as e:  # counted below
                failures.append(e)

    try:
        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        cluster["a1"].kill()
        for t in threads:
            t.join()
        assert not failures, failures[:3]
        assert len(done) == 240
    finally:
        client.close()
        stop_server(server, config)
        router.close()


def test_every_replica_down_fails_within_the_deadline_or_answers_partially(cluster):
    router, server, config, client, port = _router(cluster)
    partial_router, partial_server, _, partial_client, _ = _router(cluster, partial=True)
    try:
        cluster["b1"].kill()
        t = time.monotonic()
        with pytest.raises(Unavailable):
            client.search([_vectors(1, 4)[0]], k=5, timeout=5)
        assert time.monotonic() - t < 5
        rows, missing = partial_router.search_with_coverage([_vectors(1, 4)[0]], k=5)
        assert missing == [2, 3] and len(rows[0]) == 5
        from datastore.sharding import shard_of
        assert set(shard_of(np.array([h.id for h in rows[0]]), 4).tolist()) <= {0, 1}
        # the router's own health follows its shard servers
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
            if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            time.sleep(0.1)
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        for c in (client, partial_client):
            c.close()
        stop_server(server, config)
        stop_server(partial_server, config)
        router.close()
        partial_router.close()


def test_a_shard_server_refuses_ids_of_other_shards(datastore_dir):
    with open_datastore(datastore_dir, shard_ids=[0]) as ds:
        from datastore.sharding import shard_of
        other = next(i for i in range(100) if shard_of(i, 4) != 0)
        with pytest.raises(InvalidArgument, match="not served here"):
            ds.upsert([Passage(other, "x")], _vectors(1, 9))
        new = ds.upsert([Passage(-1, "y")], _vectors(1, 9))
        assert shard_of(new[0], 4) == 0
        ds.delete(new)


# -- keys, replica consistency, deadlines and hedging -------------------------------------------


def _wait_for(predicate, seconds: float = 15.0, step: float = 0.1) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


@pytest.fixture(scope="module")
def keyed_dir(tmp_path_factory) -> tuple[Path, dict[str, str], dict[str, int], np.ndarray]:
    """A 2-shard datastore with keys: admin, tenants acme and beta, and one passage only
    acme may see (its vector far from every public one)."""
    d = tmp_path_factory.mktemp("keyed")
    np.save(d / "v.npy", _vectors(400, 5))
    (d / "p.jsonl").write_text("".join(f'{{"text": "public {i}"}}\n' for i in range(400)))
    build(BuildConfig([str(d / "p.jsonl")], d / "ds", embeddings=d / "v.npy", shards=2, vector_dtype="float32",
                      dedup=DedupConfig(near=False), progress=False))
    secret = _vectors(1, 6)
    with open_datastore(d / "ds") as ds:
        ds.create_tenant("acme")
        ds.create_tenant("beta")
        [pid] = ds.upsert([Passage(-1, "acme secret", tenants=("acme",))], secret)
        keys = {"admin": ds.control.create_key(None)[0], "acme": ds.control.create_key("acme")[0],
                "beta": ds.control.create_key("beta")[0]}
    return d / "ds", keys, {"secret": pid}, secret


def test_the_router_forwards_each_callers_key(keyed_dir):
    from datastore.errors import PermissionDenied, Unauthenticated

    directory, keys, ids, secret = keyed_dir
    servers = [ShardServer(directory, "0"), ShardServer(directory, "1")]
    # the router's own key is an admin key: a caller must never borrow it
    router = Router(RouterConfig([[servers[0].address], [servers[1].address]], api_key=keys["admin"]))
    config = ServerConfig(max_workers=8, grace_seconds=0.2)
    server, port = create_server(router, "127.0.0.1:0", config)
    address = f"127.0.0.1:{port}"
    try:
        with DatastoreClient(address, api_key=keys["acme"], timeout=10) as acme:
            hits = acme.search([secret[0]], k=5)[0]
            assert hits[0].id == ids["secret"] and hits[0].text == "acme secret"
            with pytest.raises(PermissionDenied):
                acme.search([secret[0]], k=5, tenant="beta")
            with pytest.raises(PermissionDenied):  # a tenant key may not write
                acme.delete([ids["secret"]])
        with DatastoreClient(address, api_key=keys["beta"], timeout=10) as beta:
            hits = beta.search([secret[0]], k=5)[0]
            assert len(hits) == 5 and ids["secret"] not in [h.id for h in hits]
            with pytest.raises(NotFound):
                beta.get_passages([ids["secret"]])
        with DatastoreClient(address, api_key=keys["admin"], timeout=10) as admin:
            assert admin.search([secret[0]], k=1, tenant="acme")[0][0].id == ids["secret"]
        for key in ("ds_0123456789abcdef_" + "x" * 43, None):
            with DatastoreClient(address, api_key=key, timeout=10) as stranger:
                with pytest.raises(Unauthenticated):
                    stranger.search([secret[0]], k=5)
                with pytest.raises(Unauthenticated):
                    stranger.get_passages([ids["secret"]])
        # copying a shard (what --seed-from does) is for admins only
        from datastore.snapshot import seed_from
        with pytest.raises(PermissionDenied):
            seed_from(servers[0].address, directory.parent / "copy", [0], api_key=keys["acme"])
        with pytest.raises(Unauthenticated):
            seed_from(servers[0].address, directory.parent / "copy", [0])
    finally:
        stop_server(server, config)
        router.close()
        for s in servers:
            s.stop()


def test_a_replica_that_missed_a_write_is_not_read_until_resynced(datastore_dir, tmp_path):
    import shutil

    d1, d2 = tmp_path / "r1", tmp_path / "r2"
    shutil.copytree(datastore_dir, d1)
    shutil.copytree(datastore_dir, d2)
    r1, r2 = ShardServer(d1, "0,1,2,3"), ShardServer(d2, "0,1,2,3")
    router = Router(RouterConfig([[r1.address, r2.address]], per_shard_timeout=2.0, health_interval=0.2))
    config = ServerConfig(max_workers=4, grace_seconds=0.2)
    server, port = create_server(router, "127.0.0.1:0", config)

    def state() -> dict[str, bool]:
        return {s.address: s.stale for s in router.replica_status()}

    try:
        assert state() == {r1.address: False, r2.address: False}
        r2.kill()
        new = _vectors(5, 11)
        ids = router.upsert([Passage(-1, f"late {i}") for i in range(5)], new)
        assert state()[r2.address] and "Upsert" in next(s.reason for s in router.replica_status()
                                                         if s.address == r2.address)
        # surfaced in Stats and in the metrics
        with DatastoreClient(f"127.0.0.1:{port}") as client:
            seen = {r["address"]: r for r in client.stats().replicas}
        assert seen[r2.address]["stale"] and not seen[r1.address]["stale"] and seen[r2.address]["shard_ids"] == [0, 1, 2, 3]
        from prometheus_client import generate_latest

        from service.metrics import REGISTRY
        assert f'datastore_router_replica_stale{{replica="{r2.address}"}} 1.0' in generate_latest(REGISTRY).decode()
        # back on its old port with its old data: reachable, still stale, never read
        r2 = ShardServer(d2, "0,1,2,3", r2.port)
        assert _wait_for(lambda: all(s.healthy for s in router.replica_status()))
        time.sleep(0.5)  # a few health rounds: it must stay stale
        assert state()[r2.address]
        with DatastoreClient(r2.address) as direct:  # it really lacks the write
            assert [row[0].id for row in direct.search(list(new), k=1)] != ids
        for _ in range(10):  # replicas alternate: every read must come from r1
            assert [row[0].id for row in router.search(list(new), k=1)] == ids
        # equal write sequences are not enough: the same writes with other data stay stale
        r2.stop()
        with open_datastore(d2) as ds:
            ds.upsert([Passage(i, f"other {i}") for i in ids], new)
        r2 = ShardServer(d2, "0,1,2,3", r2.port)
        assert _wait_for(lambda: "different data" in next(s.reason for s in router.replica_status()
                                                             if s.address == r2.address)), router.replica_status()
        assert state()[r2.address]
        # resync: restart it seeded from the live replica; the router verifies and reads it again
        r2.stop()
        r2 = ShardServer(d2, "0,1,2,3", r2.port, "--seed-from", r1.address)
        assert _wait_for(lambda: not state()[r2.address]), router.replica_status()
        queries = list(_vectors(20, 12)) + list(new)
        with DatastoreClient(r1.address) as a, DatastoreClient(r2.address) as b:
            assert [[h.id for h in row] for row in a.search(queries, k=10)] == \
                   [[h.id for h in row] for row in b.search(queries, k=10)]
            assert a.stats().passages == b.stats().passages
        r1.kill()
        assert [row[0].id for row in router.search(list(new), k=1)] == ids  # served by the resynced r2
    finally:
        stop_server(server, config)
        router.close()
        r1.stop()
        r2.stop()


def _digests(address: str) -> dict[int, tuple[int, str]]:
    from service.pb import datastore_pb2 as pb
    from service.pb import datastore_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as ch:
        answer = pb_grpc.DatastoreStub(ch).Stats(pb.StatsRequest(with_digest=True), timeout=30)
    return {s.shard_id: (s.write_seq, s.digest) for s in answer.shards}


def test_a_reseeded_replica_rejoins_while_writes_go_on(datastore_dir, tmp_path, caplog):
    """Writes never stop: the reseeded replica's copy is behind by the time it serves, and
    the router hands it the writes it lacks from its write log, then reads from it again."""
    import shutil

    d1, d2 = tmp_path / "r1", tmp_path / "r2"
    shutil.copytree(datastore_dir, d1)
    shutil.copytree(datastore_dir, d2)
    r1, r2 = ShardServer(d1, "0,1,2,3"), ShardServer(d2, "0,1,2,3")
    router = Router(RouterConfig([[r1.address, r2.address]], per_shard_timeout=2.0, health_interval=0.2))
    stop, acked, deleted, errors = threading.Event(), [], set(), []

    def write() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                acked.extend(router.upsert([Passage(-1, f"w{n} {i}") for i in range(3)], _vectors(3, 100 + n)))
                if n % 5 == 0:  # deletes too, cut across shards
                    router.delete(acked[-7:-4])
                    deleted.update(acked[-7:-4])
                if n % 7 == 0:  # and rewrites of existing passages
                    router.upsert([Passage(acked[-1], f"again {n}")], _vectors(1, 900 + n))
            except Exception as e:  # noqa: BLE001  # every failure is asserted on below
                errors.append(e)
            time.sleep(0.005)

    def stale(address: str) -> bool:
        return next(s.stale for s in router.replica_status() if s.address == address)

    writer = threading.Thread(target=write)
    try:
        assert not stale(r2.address)
        base = router.stats().passages
        writer.start()
        time.sleep(0.5)
        r2.kill()
        assert _wait_for(lambda: stale(r2.address))
        time.sleep(0.5)
        r2 = ShardServer(d2, "0,1,2,3", r2.port, "--seed-from", r1.address)
        t = time.monotonic()
        assert _wait_for(lambda: not stale(r2.address), seconds=30), router.replica_status()
        rejoined, at = time.monotonic() - t, len(acked)
        assert _wait_for(lambda: len(acked) > at + 30)  # writes went on after it rejoined
        assert not stale(r2.address) and writer.is_alive()
        stop.set()
        writer.join()
        assert not errors, errors[:3]
        assert not stale(r2.address), router.replica_status()
        assert rejoined < 30
        replayed = [int(m.group(1)) for r in caplog.records
                    for m in [re.search(r"sent it (\d+) writes its copy lacked", r.getMessage())] if m]
        assert replayed and sum(replayed) > 0, "the copy was not behind: the test did not test catching up"
        # same data on both: sequences and digests, every acknowledged write on both
        assert _digests(r1.address) == _digests(r2.address)
        live = sorted(set(acked) - deleted)
        with DatastoreClient(r1.address) as a, DatastoreClient(r2.address) as b:
            assert [p.text for p in a.get_passages(live)] == [p.text for p in b.get_passages(live)]
            assert a.stats().passages == b.stats().passages == base + len(live)
            queries = list(_vectors(10, 12))
            assert [[h.id for h in row] for row in a.search(queries, k=10)] == \
                   [[h.id for h in row] for row in b.search(queries, k=10)]
    finally:
        stop.set()
        if writer.is_alive():
            writer.join()
        router.close()
        r1.stop()
        r2.stop()


def test_ids_beyond_int64_through_the_router_are_invalid(cluster):
    router, server, config, client, _ = _router(cluster)
    big = 2**63 + 5
    try:
        for call in (lambda: client.get_passages([big]), lambda: client.delete([5, big]),
                     lambda: client.upsert([Passage(big, "x")], _vectors(1, 3))):
            with pytest.raises(InvalidArgument):
                call()
        for call in (lambda: router.grant([big], "t"), lambda: router.revoke([big], "t")):
            with pytest.raises(InvalidArgument):
                call()
        from datastore.errors import ResourceExhausted
        with pytest.raises(ResourceExhausted):  # checked before any text is embedded
            router.search(["some text"] * (router.limits.max_hits // router.limits.max_k + 1), k=router.limits.max_k)
    finally:
        client.close()
        stop_server(server, config)
        router.close()


def test_deadlines_per_shard_timeouts_and_hedging_when_a_server_hangs(cluster):
    """A SIGSTOPped server is alive but silent: only deadlines (or hedging) end its calls."""
    from datastore.errors import DeadlineExceeded
    from service.router import HEDGES

    a1, b1 = cluster["a1"], cluster["b1"]
    servers = [[a1.address, cluster["a2"].address], [b1.address]]
    fail_router, fail_server, config, fail_client, _ = _router(cluster)
    partial_router, partial_server, _, partial_client, _ = _router(cluster, partial=True)
    quick = Router(RouterConfig(servers, per_shard_timeout=0.3, health_interval=60))
    # health checks far apart: a hung replica stays "healthy", only hedging avoids waiting on it
    hedged = Router(RouterConfig(servers, per_shard_timeout=5, health_interval=60, hedge_after_ms=50))
    plain = Router(RouterConfig(servers, per_shard_timeout=1, health_interval=60))
    q = [_vectors(1, 4)[0]]
    try:
        b1.proc.send_signal(signal.SIGSTOP)
        try:
            t = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                fail_client.search(q, k=5, timeout=0.5)
            assert time.monotonic() - t < 1.5
            t = time.monotonic()
            rows, missing = partial_router.search_with_coverage(q, k=5, timeout=0.5)
            assert time.monotonic() - t < 0.5 and missing == [2, 3] and len(rows[0]) == 5
            t = time.monotonic()
            assert len(partial_client.search(q, k=5, timeout=0.8)[0]) == 5  # answered, not timed out
            assert time.monotonic() - t < 0.8
            t = time.monotonic()
            with pytest.raises(Unavailable):  # the per-shard timeout ends it long before the deadline
                quick.search_with_coverage(q, k=5, timeout=10)
            assert time.monotonic() - t < 2
        finally:
            b1.proc.send_signal(signal.SIGCONT)
        name = f"{a1.address},{cluster['a2'].address}"
        before = HEDGES.labels(name)._value.get()
        a1.proc.send_signal(signal.SIGSTOP)
        try:
            t = time.monotonic()
            for _ in range(6):  # rotation puts the hung replica first every other call
                assert len(hedged.search(q, k=5)[0]) == 5
            assert time.monotonic() - t < 3
            assert HEDGES.labels(name)._value.get() - before >= 3
            t = time.monotonic()
            for _ in range(2):  # without hedging one of two calls waits out the per-shard timeout
                plain.search(q, k=5)
            assert time.monotonic() - t >= 0.9
        finally:
            a1.proc.send_signal(signal.SIGCONT)
    finally:
        for c in (fail_client, partial_client):
            c.close()
        stop_server(fail_server, config)
        stop_server(partial_server, config)
        for r in (fail_router, partial_router, quick, hedged, plain):
            r.close()


def test_a_damaged_snapshot_is_refused(datastore_dir, tmp_path):
    from datastore.errors import FailedPrecondition
    from datastore.snapshot import Chunk, SnapshotSource, download

    with open_datastore(datastore_dir, shard_ids=[1]) as ds:
        source = SnapshotSource(ds)
        whole = download(lambda sid, off: source.read(sid, 1, False, off), tmp_path / "good")
        assert whole.write_seq == ds.shards[0].seq and whole.total_bytes == (tmp_path / "good" / "data.mdb").stat().st_size

        def flip(sid: str, off: int) -> Chunk:
            c = source.read(sid, 1, False, off)
            return Chunk(c.snapshot_id, bytes([c.data[0] ^ 1]) + c.data[1:], c.total_bytes, c.sha256, c.write_seq,
                         c.last)

        with pytest.raises(FailedPrecondition, match="damaged"):
            download(flip, tmp_path / "bad")
        with pytest.raises(NotFound):  # only shard 1 is served here
            source.read("", 0, False, 0)
        source.close()


def test_one_snapshot_copy_per_shard_at_a_time(datastore_dir, tmp_path, monkeypatch):
    """Readers share a shard's copy while nothing was written; a newer one is refused while
    the older is read, and the copy is gone once read to the end."""
    import shutil

    from datastore import snapshot
    from datastore.errors import ResourceExhausted
    from datastore.sharding import shard_of

    monkeypatch.setattr(snapshot, "CHUNK_BYTES", 4096)
    shutil.copytree(datastore_dir, tmp_path / "ds")
    on_1 = next(i for i in range(10**6, 10**6 + 100) if int(shard_of(i, 4)) == 1)
    with open_datastore(tmp_path / "ds", shard_ids=[1]) as ds:
        source = snapshot.SnapshotSource(ds)
        scratch = tmp_path / "ds" / snapshot.SCRATCH
        first = source.read("", 1, False, 0)
        assert not first.last and source.read("", 1, False, 0).snapshot_id == first.snapshot_id  # shared
        assert source.live_copies() == 1 and len(list(scratch.iterdir())) == 1
        ds.upsert([Passage(on_1, "newer")], _vectors(1, 40))
        with pytest.raises(ResourceExhausted):  # the shard changed: a second copy is refused
            source.read("", 1, False, 0)
        for _ in range(2):  # both readers read to the end: then the copy is deleted
            got = snapshot.download(lambda sid, off: source.read(sid or first.snapshot_id, 1, False, off),
                                    tmp_path / "dl")
            assert got.snapshot_id == first.snapshot_id
        assert source.live_copies() == 0 and list(scratch.iterdir()) == []
        fresh = source.read("", 1, False, 0)  # a new one, of the newer state
        assert fresh.snapshot_id != first.snapshot_id and fresh.write_seq == ds.shards[0].seq
        source.close()
        # a copy nobody reads on is given up for a newer one
        source = snapshot.SnapshotSource(ds, abandoned=0.0)
        old = source.read("", 1, False, 0)
        ds.upsert([Passage(on_1, "newest")], _vectors(1, 41))
        new = source.read("", 1, False, 0)
        assert new.snapshot_id != old.snapshot_id and source.live_copies() == 1
        with pytest.raises(NotFound):
            source.read(old.snapshot_id, 1, False, 4096)
        source.close()
