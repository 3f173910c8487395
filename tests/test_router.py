"""Shard servers as subprocesses on loopback plus a router: same answers as the embedded
store, replica failover without failed requests, and the all-replicas-down policy."""

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
    """`datastore serve DIR --shards ...` in a subprocess on a free loopback port."""

    def __init__(self, directory: Path, shards: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "datastore.cli", "serve", str(directory), "--shards", shards, "--port", "0"],
            env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE, text=True)
        line = self.proc.stderr.readline()
        match = re.search(r"on ([\d.]+:\d+)", line)
        assert match, line + self.proc.stderr.read()
        self.address = match.group(1)

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
