"""One algo's benchmark, run in a fresh process so that its memory and threads are its own.

Started by bench.ann as `python -m bench.worker SPEC.json`; appends one JSON line per
parameter point to the results file named in the spec. Peer libraries are imported
only here, after the thread limits are in place.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class WorkerSpec:
    algo: str
    dataset: str
    out: str
    build_points: list[dict[str, Any]]
    search_points: list[dict[str, Any]]
    k: int = 10
    threads: int = 1
    cold: bool = False
    batch_size: int = 1000
    batch_budget_s: float = 60.0
    single_queries: int = 1000
    single_budget_s: float = 5.0
    min_single: int = 10
    max_queries: int | None = None
    workdir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def base_row(spec: WorkerSpec, name: str, n: int | None, dim: int | None) -> dict[str, Any]:
    """The fields every result line has, in the order of the issue's schema."""
    return {"algo": spec.algo, "params": {}, "dataset": name, "n": n, "dim": dim, "k": spec.k,
            "recall_at_10": None, "qps_batch": None, "qps_single": None, "p50_ms": None, "p99_ms": None,
            "build_s": None, "ram_bytes": None, "disk_bytes": None, "threads": spec.threads, "cold": spec.cold}


def emit(spec: WorkerSpec, row: dict[str, Any]) -> None:
    with open(spec.out, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
    shown = {k: row.get(k) for k in ("algo", "params", "recall_at_10", "qps_batch", "qps_single", "skipped")}
    print("result:", json.dumps(shown), file=sys.stderr, flush=True)


def _search_grouped(adapter, queries, k, params, tenants) -> np.ndarray:
    """Batch search; tenant datasets search each tenant's queries as that tenant."""
    if tenants is None:
        return adapter.search(queries, k, params)
    out = np.full((len(queries), k), -1, np.int64)
    for t in np.unique(tenants):
        rows = np.flatnonzero(tenants == t)
        out[rows] = adapter.search(queries[rows], k, params, tenant=str(t))
    return out


def measure_batch(adapter, ds, spec: WorkerSpec, params) -> tuple[float, float, int]:
    """(recall@10, batch QPS, queries used): chunks of batch_size until all or the time budget."""
    from bench.datasets import recall_at_k

    found, done, elapsed = [], 0, 0.0
    nq = len(ds.queries)
    while done < nq and (done == 0 or elapsed < spec.batch_budget_s):
        q = ds.queries[done:done + spec.batch_size]
        qt = None if ds.query_tenants is None else ds.query_tenants[done:done + len(q)]
        t0 = time.perf_counter()
        ids = _search_grouped(adapter, q, spec.k, params, qt)
        elapsed += time.perf_counter() - t0
        found.append(np.asarray(ids)[:, :spec.k])
        done += len(q)
    ids = np.vstack(found)
    return recall_at_k(ids, ds.gt[:done], 10), done / elapsed, done


def measure_single(adapter, ds, spec: WorkerSpec, params) -> tuple[float, float | None, float | None]:
    """(QPS, p50 ms, p99 ms) one query at a time over a prefix of the queries, within a time budget."""
    from bench.measure import latency_percentiles

    lat: list[float] = []
    total = 0.0
    limit = min(spec.single_queries, len(ds.queries))
    for i in range(limit):
        if total > spec.single_budget_s and len(lat) >= spec.min_single:
            break
        q = ds.queries[i:i + 1]
        tenant = None if ds.query_tenants is None else str(ds.query_tenants[i])
        t0 = time.perf_counter()
        adapter.search(q, spec.k, params, tenant=tenant)
        dt = time.perf_counter() - t0
        lat.append(dt)
        total += dt
    p50, p99 = latency_percentiles(lat)
    return len(lat) / total, p50, p99


def run(spec: WorkerSpec) -> int:
    from bench.measure import pin_threads

    pin_threads(spec.threads)  # before any peer library starts its pools

    from bench.adapter import PeerUnavailable
    from bench.algos import NotYetAvailable, resolve
    from bench.datasets import load_dataset
    from bench.measure import PeakMemory, drop_page_cache, release_free_memory, rss_bytes

    ds = load_dataset(spec.dataset, max_queries=spec.max_queries)
    row0 = base_row(spec, ds.name, ds.n, ds.dim)
    try:
        cls = resolve(spec.algo)
        cls.check_available()
        if ds.has_tenants and not cls.supports_tenants:
            raise PeerUnavailable(f"{spec.algo} has no tenant-filtered search; this dataset has tenants")
    except (PeerUnavailable, NotYetAvailable) as e:
        emit(spec, {**row0, "skipped": str(e)})
        return 0
    tenants = ds.tenant_lists() if ds.has_tenants else None

    for build_params in spec.build_points:
        workdir = Path(tempfile.mkdtemp(prefix=f"bench-{spec.algo}-", dir=spec.workdir))
        try:
            adapter = cls(workdir / "index", ds.dim, ds.metric, spec.threads)
            release_free_memory()
            t0, cpu0 = time.perf_counter(), _cpu_s()
            with PeakMemory() as build_memory:  # beyond the base vectors, already loaded
                adapter.build(ds.base, build_params, tenants)
            build_s = time.perf_counter() - t0
            # CPU seconds of the build (all its threads): on a shared machine wall time mostly
            # measures the neighbours, CPU time the build.
            build_row = {**row0, "build_peak_bytes": build_memory.peak, "build_cpu_s": round(_cpu_s() - cpu0, 3)}
            adapter.close()
            del adapter
            # extra["then_warm"]: after a cold pass, the same points warm from the same build,
            # so an index that takes an hour to build is built once for both.
            for cold in [spec.cold] + ([False] if spec.cold and spec.extra.get("then_warm") else []):
                _points(replace(spec, cold=cold), cls, ds, workdir, build_params, build_s,
                        {**build_row, "cold": cold}, drop_page_cache, release_free_memory, rss_bytes)
        except Exception as e:  # noqa: BLE001 -- one failing build must not hide the others' results
            traceback.print_exc()
            emit(spec, {**row0, "params": build_params, "skipped": f"failed: {type(e).__name__}: {e}"})
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _points(spec, cls, ds, workdir, build_params, build_s, row0, drop_page_cache, release_free_memory, rss_bytes):
    from bench.measure import anon_bytes

    adapter = None
    rss0 = anon0 = 0
    load_s = 0.0
    peak = anon_peak = 0
    for i, search_params in enumerate(spec.search_points):
        cold_method = None
        if adapter is None or spec.cold:
            # Cold: reopen for each point, since pages a live index has mapped never leave the cache.
            if adapter is not None:
                adapter.close()
                adapter = None
            release_free_memory()
            rss0, anon0 = rss_bytes(), anon_bytes()
            adapter = cls(workdir / "index", ds.dim, ds.metric, spec.threads)
            if spec.cold:
                cold_method = drop_page_cache(adapter.index_files())
            t0 = time.perf_counter()
            adapter.load(build_params)
            load_s = time.perf_counter() - t0
            peak, anon_peak = rss_bytes(), anon_bytes()
        params = {**build_params, **search_params}
        if not spec.cold:
            adapter.search(ds.queries[:min(10, len(ds.queries))], spec.k, params,
                           tenant=None if ds.query_tenants is None else str(ds.query_tenants[0]))
        recall, qps_batch, used = measure_batch(adapter, ds, spec, params)
        if spec.cold:  # reopen: pages the batch mapped would survive a drop and warm the single queries
            adapter.close()
            adapter = cls(workdir / "index", ds.dim, ds.metric, spec.threads)
            drop_page_cache(adapter.index_files())
            adapter.load(build_params)
        qps_single, p50, p99 = measure_single(adapter, ds, spec, params)
        peak, anon_peak = max(peak, rss_bytes()), max(anon_peak, anon_bytes())
        row = {**row0, "params": params, "recall_at_10": round(recall, 5), "qps_batch": round(qps_batch, 2),
               "qps_single": round(qps_single, 2), "p50_ms": _r(p50), "p99_ms": _r(p99),
               "build_s": round(build_s, 3), "ram_bytes": max(0, anon_peak - anon0),
               # RSS growth including mmap'd index file pages (page cache the kernel can reclaim)
               "rss_bytes": max(0, peak - rss0), "disk_bytes": adapter.disk_bytes(),
               "threads": spec.threads, "cold": spec.cold, "queries": used, "load_s": round(load_s, 3),
               # The 1-minute load average at the end of the point: a busy machine shows here.
               "loadavg": round(os.getloadavg()[0], 2)}
        if cold_method:
            row["cold_method"] = cold_method
        emit(spec, row)
    if adapter is not None:
        adapter.close()
    gc.collect()


def _cpu_s() -> float:
    """User + system CPU seconds of this process so far (every thread)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m bench.worker SPEC.json", file=sys.stderr)
        return 2
    spec = WorkerSpec(**json.loads(Path(argv[0]).read_text()))
    return run(spec)


if __name__ == "__main__":
    sys.exit(main())
