"""Router benchmark: QPS and latency through shard servers and a router on loopback, against
in-process search of the same data, and a 64-shard fan-out simulation from measured
per-shard latencies.

    python -m bench.router --shards 1 --shards 4 --shards 16 --clients 32 --seconds 10

Prints one JSON line per configuration. All processes (the load generator, the router, every
shard server) share this machine's cores, so the absolute numbers say little; read the ratio
router/in-process and the CPU milliseconds each role spends per query (load from other
programs changes QPS, much less the CPU per query).

The in-process baseline is `Datastore.search(..., include_text=False)` over all shards in the
bench process: the same answer the router returns (ids, scores, titles), 32 client threads.
`in_process_ids_only` is `search_vectors` (no passage fetch), a lower bound. The router is
measured with its default batching (concurrent searches with the same options go to the
shards as one batched Search) and with `--batch-in-flight 0` (one shard call per request).
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


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _measured(pids: dict[str, list[int]], fn) -> tuple[dict, dict]:
    """Run fn() (a _load) and the CPU ms per request each group of processes spent on it."""
    before = {k: [_cpu_seconds(p) for p in v] for k, v in pids.items()}
    result = fn()
    cpu = {k: round(sum(_cpu_seconds(p) - b for p, b in zip(v, before[k])) * 1e3 / max(1, result["requests"]), 3)
           for k, v in pids.items()}
    return result, cpu


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
    me = {"client": [os.getpid()]}
    with open_datastore(ds_dir) as ds:
        local, local_cpu = _measured(me, lambda: _load(lambda q: ds.search([q], k, include_text=False), queries,
                                                       clients, seconds))
        ids_only = _load(lambda q: ds.search_vectors(q[None, :], k), queries, clients, seconds)
    procs = []
    try:
        addrs = []
        for s in range(shards):
            p, a = _spawn(["serve", str(ds_dir), "--shards", str(s)])
            procs.append(p)
            addrs.append(a)
        shard_pids = [p.pid for p in procs]
        routed, routed_cpu = {}, {}
        for name, batch in (("router", 2), ("router_unbatched", 0)):
            p, router = _spawn(["serve", "--router", "--batch-in-flight", str(batch)]
                               + [x for a in addrs for x in ("--shard", a)])
            procs.append(p)
            with DatastoreClient(router) as client:
                _load(lambda q: client.search([q], k=k, include_text=False), queries, clients, 1.0)  # warm up
                routed[name], routed_cpu[name] = _measured(
                    {"shards": shard_pids, "router": [p.pid], **me},
                    lambda: _load(lambda q: client.search([q], k=k, include_text=False), queries, clients, seconds))
            p.terminate()
            p.wait(timeout=30)
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
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait(timeout=30)
    return {"bench": "router", "shards": shards, "n": n, "dim": dim, "k": k, "clients": clients,
            "loadavg_1m": round(os.getloadavg()[0], 2),
            "in_process": local, "in_process_ids_only": ids_only, **routed, "one_shard_direct": shard,
            "cpu_ms_per_query": {"in_process": local_cpu["client"], **routed_cpu},
            "router_over_in_process_qps": round(routed["router"]["qps"] / local["qps"], 3),
            "router_unbatched_over_in_process_qps": round(routed["router_unbatched"]["qps"] / local["qps"], 3),
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
    # one faiss thread per search on both sides (as `datastore serve` does); the environment
    # reaches every thread, omp_set_num_threads only the calling one
    os.environ["OMP_NUM_THREADS"] = "1"
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
