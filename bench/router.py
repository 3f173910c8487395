"""Router benchmark: QPS and latency through shard servers and a router on loopback, against
in-process search of the same data, and a 64-shard fan-out simulation from measured
per-shard latencies.

    python -m bench.router --shards 1 --shards 4 --shards 16 --clients 32 --seconds 10

Prints one JSON line per configuration. All processes share this machine's cores, so the
absolute numbers say little; the ratio router/in-process is the figure to read.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _dataset(directory: Path, n: int, dim: int, shards: int, seed: int) -> Path:
    from datastore.build import BuildConfig, build
    from datastore.dedup import DedupConfig

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    np.save(directory / "v.npy", x)
    (directory / "p.jsonl").write_text("".join(f'{{"text": "p{i}"}}\n' for i in range(n)))
    out = directory / f"ds-{shards}"
    build(BuildConfig([str(directory / "p.jsonl")], out, embeddings=directory / "v.npy", shards=shards,
                      vector_dtype="float32", dedup=DedupConfig(exact=False, near=False), progress=False))
    return out


def _spawn(args: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "datastore.cli", *args, "--port", "0"], stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    while True:
        line = proc.stderr.readline()
        if not line:
            raise RuntimeError(f"{args} exited: {proc.stderr.read()}")
        if m := re.search(r"serving .* on ([\d.]+:\d+)", line):
            return proc, m.group(1)


def _load(search, queries: np.ndarray, clients: int, seconds: float) -> dict:
    """`clients` threads sending one query at a time for `seconds`; latency percentiles."""
    lat: list[list[float]] = [[] for _ in range(clients)]
    errors = [0]
    stop = time.monotonic() + seconds

    def run(c: int) -> None:
        i = c
        while time.monotonic() < stop:
            t = time.perf_counter()
            try:
                search(queries[i % len(queries)])
            except Exception:  # counted, not raised: a load test reports failures
                errors[0] += 1
            lat[c].append(time.perf_counter() - t)
            i += clients

    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    all_lat = np.concatenate([np.asarray(x) for x in lat]) * 1e3
    return {"qps": round(len(all_lat) / wall, 1), "p50_ms": round(float(np.percentile(all_lat, 50)), 3),
            "p99_ms": round(float(np.percentile(all_lat, 99)), 3), "errors": errors[0], "requests": len(all_lat)}


def run_config(base: Path, shards: int, n: int, dim: int, clients: int, seconds: float, k: int) -> dict:
    from datastore.store import open_datastore
    from service.client import DatastoreClient

    ds_dir = _dataset(base, n, dim, shards, seed=shards)
    queries = np.random.default_rng(99).standard_normal((512, dim)).astype(np.float32)
    with open_datastore(ds_dir) as ds:
        local = _load(lambda q: ds.search_vectors(q[None, :], k), queries, clients, seconds)
    procs = []
    try:
        addrs = []
        for s in range(shards):
            p, a = _spawn(["serve", str(ds_dir), "--shards", str(s)])
            procs.append(p)
            addrs.append(a)
        router_args = ["serve", "--router"] + [x for a in addrs for x in ("--shard", a)]
        p, router = _spawn(router_args)
        procs.append(p)
        with DatastoreClient(router) as client:
            routed = _load(lambda q: client.search([q], k=k, include_text=False), queries, clients, seconds)
            # per-shard latency distribution, for the fan-out simulation
        with DatastoreClient(addrs[0]) as one:
            shard = _load(lambda q: one.search([q], k=k, include_text=False), queries, 1, min(seconds, 3.0))
            samples = []
            for q in queries[:200]:
                t = time.perf_counter()
                one.search([q], k=k, include_text=False)
                samples.append((time.perf_counter() - t) * 1e3)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
    return {"bench": "router", "shards": shards, "n": n, "dim": dim, "k": k, "clients": clients,
            "in_process": local, "router": routed, "one_shard_direct": shard,
            "router_over_in_process_qps": round(routed["qps"] / local["qps"], 3),
            "shard_latency_ms": samples}


def simulate_fanout(samples_ms: list[float], shards: int, hop_ms: float, trials: int = 20_000,
                    seed: int = 0) -> dict:
    """Fan-out latency of `shards` shards: the slowest of `shards` draws from the measured
    single-shard latencies, plus a hop each way."""
    rng = np.random.default_rng(seed)
    draws = rng.choice(np.asarray(samples_ms), size=(trials, shards)).max(1) + 2 * hop_ms
    return {"bench": "router-simulation", "shards": shards, "hop_ms": hop_ms,
            "p50_ms": round(float(np.percentile(draws, 50)), 3), "p99_ms": round(float(np.percentile(draws, 99)), 3)}


@click.command("router")
@click.option("--shards", "shard_counts", multiple=True, type=int, default=(1, 4, 16), show_default=True)
@click.option("--n", default=200_000, show_default=True, help="Vectors in the synthetic datastore.")
@click.option("--dim", default=64, show_default=True)
@click.option("--clients", default=32, show_default=True)
@click.option("--seconds", default=10.0, show_default=True)
@click.option("--k", default=10, show_default=True)
@click.option("--simulate", default=64, show_default=True, help="Shards of the fan-out simulation.")
@click.option("--hop-ms", default=0.3, show_default=True, help="Assumed network hop of the simulation.")
def router(shard_counts, n, dim, clients, seconds, k, simulate, hop_ms) -> None:
    """Router vs in-process QPS and latency; prints one JSON line per configuration."""
    import faiss

    faiss.omp_set_num_threads(1)  # as `datastore serve` does: parallelism comes from the clients
    samples: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-router-") as tmp:
        for shards in shard_counts:
            d = Path(tmp) / f"s{shards}"
            d.mkdir()
            result = run_config(d, shards, n, dim, clients, seconds, k)
            samples = result.pop("shard_latency_ms")
            click.echo(json.dumps(result))
    if samples and simulate:
        click.echo(json.dumps(simulate_fanout(samples, simulate, hop_ms)))


if __name__ == "__main__":
    router()
