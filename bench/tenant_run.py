"""The multi-tenant benchmark: each algo built once, then measured per tenant-size bucket.

    datastore bench tenants --dataset data/glove-50-tenants-clustered --out runs/t.jsonl

A tenant dataset (bench.tenant_data) spreads its queries over tenants of every size; a
result read over all of them would mix a 10-vector tenant with a 80,000-vector one. Here
each algo runs in its own process (as `bench ann` does, so its memory is its own), builds
each build point once, and for every search point measures each bucket of tenant size
separately: one JSON line per (point, bucket), the `bench ann` schema plus
`tenant_fraction` [lo, hi] (the share of the base the queries' tenants see), `queries`, and
`cpu_qps_batch` / `cpu_qps_single` (QPS by CPU time, steadier than the wall clock on a busy
machine; `bench plot --cpu` reads them).
"""

from __future__ import annotations

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

from bench.worker import WorkerSpec, base_row, emit

#: Peers that take ~0.1-2 s a query on small tenants (hnswlib's filter is a Python callback per
#: visited node; Milvus Lite evaluates its expression over every row): measured in chunks of 10.
SLOW_ALGOS = ("hnswlib-filter", "milvus-lite-filter")


@dataclass
class TenantRunConfig:
    """One `bench tenants` invocation."""

    dataset: Path
    out: Path
    algos: list[str] = field(default_factory=list)
    param_grid: str | None = None
    batch_size: int = 100
    batch_budget_s: float = 5.0
    single_queries: int = 300
    single_budget_s: float = 1.5
    #: Queries per bucket (the first ones of each).
    max_queries: int = 1000
    timeout_s: float = 3600.0
    workdir: Path | None = None
    plot: Path | None = None

    def __post_init__(self) -> None:
        from bench.algos import TENANT_ALGOS

        self.dataset, self.out = Path(self.dataset), Path(self.out)
        self.algos = list(self.algos) or list(TENANT_ALGOS)
        for name in ("batch_size", "single_queries", "max_queries"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


def query_buckets(ds) -> list[tuple[list[float], np.ndarray]]:
    """([lo, hi], query rows) per tenant-size bucket that has queries, smallest tenants first."""
    from bench.tenant_data import SIZE_EDGES, size_bucket

    _, indices = ds.base_tenants
    size = np.bincount(indices, minlength=int(max(indices.max(initial=0), ds.query_tenants.max()) + 1))
    bucket = size_bucket(size[ds.query_tenants] / ds.n)
    return [([SIZE_EDGES[b], SIZE_EDGES[b + 1]], np.flatnonzero(bucket == b)) for b in np.unique(bucket).tolist()]


def run_tenants(config: TenantRunConfig, echo=None) -> list[dict[str, Any]]:
    """Run every algo of `config` on its tenant dataset; returns this run's result lines."""
    from bench.ann import RunConfig, _append, _count_lines, _run_worker, plan, read_results
    from bench.datasets import load_dataset
    from bench.measure import thread_env

    echo = echo or (lambda msg: print(msg, file=sys.stderr, flush=True))
    ds = load_dataset(config.dataset)  # validates, caches the tenant-filtered gt.npy once
    if not ds.has_tenants:
        raise ValueError(f"{config.dataset} has no tenants; write one with `datastore bench prepare-tenants`")
    points = plan(RunConfig(dataset=config.dataset, algos=config.algos, out=config.out, param_grid=config.param_grid))
    config.out.parent.mkdir(parents=True, exist_ok=True)
    start_line = _count_lines(config.out)
    log_path = config.out.with_suffix(".log")
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    env.update(thread_env(1))
    for algo, planned in points.items():
        spec = WorkerSpec(algo=algo, dataset=str(config.dataset), out=str(config.out), build_points=[],
                          search_points=[], batch_size=config.batch_size, batch_budget_s=config.batch_budget_s,
                          single_queries=config.single_queries, single_budget_s=config.single_budget_s,
                          max_queries=config.max_queries,
                          workdir=None if config.workdir is None else str(config.workdir))
        if isinstance(planned, str):
            _append(config.out, {**base_row(spec, ds.name, ds.n, ds.dim), "skipped": planned})
            echo(f"{algo}: skipped ({planned})")
            continue
        spec = replace(spec, build_points=planned[0], search_points=planned[1])
        if algo in SLOW_ALGOS:  # seconds a query: small chunks, so the time budget can stop them
            spec = replace(spec, batch_size=min(spec.batch_size, 10), min_single=3)
        echo(f"{algo}: {len(planned[0])} build(s) x {len(planned[1])} search point(s) x buckets ...")
        before, t0 = _count_lines(config.out), time.perf_counter()
        rc, reason = _run_worker(spec, env, log_path, config.timeout_s, module="bench.tenant_run")
        got = _count_lines(config.out) - before
        if rc != 0 and got == 0:
            _append(config.out, {**base_row(spec, ds.name, ds.n, ds.dim), "skipped": reason})
        echo(f"{algo}: {got} line(s) in {time.perf_counter() - t0:.0f}s" + (f"; {reason}" if rc else ""))
    rows = read_results(config.out)[start_line:]
    if config.plot is not None:
        from bench.plot import plot_tenant_qps

        plot_tenant_qps(rows, config.plot)
        plot_tenant_qps(rows, config.plot.with_name(config.plot.stem + "-cpu" + config.plot.suffix), "cpu_qps_batch")
    return rows


def measure(spec: WorkerSpec) -> int:
    """The worker: build each build point once, then measure every (search point, bucket)."""
    from bench.measure import pin_threads

    pin_threads(spec.threads)

    from bench.adapter import PeerUnavailable
    from bench.algos import resolve
    from bench.datasets import load_dataset

    ds = load_dataset(spec.dataset)
    row0 = base_row(spec, ds.name, ds.n, ds.dim)
    try:
        cls = resolve(spec.algo)
        cls.check_available()
        if not cls.supports_tenants:
            raise PeerUnavailable(f"{spec.algo} has no tenant-filtered search")
    except PeerUnavailable as e:
        emit(spec, {**row0, "skipped": str(e)})
        return 0
    buckets = [(lo_hi, rows[:spec.max_queries]) for lo_hi, rows in query_buckets(ds)]
    sets = [(lo_hi, replace(ds, queries=ds.queries[rows], gt=ds.gt[rows], query_tenants=ds.query_tenants[rows]))
            for lo_hi, rows in buckets]
    tenants = ds.tenant_lists()
    for build_params in spec.build_points:
        try:
            _measure_build(spec, cls, ds, sets, tenants, build_params, row0)
        except Exception as e:  # noqa: BLE001 -- one failing build must not hide the others' results
            traceback.print_exc()
            emit(spec, {**row0, "params": build_params, "skipped": f"failed: {type(e).__name__}: {e}"})
    return 0


def measure_point(adapter, ds, spec: WorkerSpec, params: dict[str, Any]) -> dict[str, Any]:
    """bench.worker's batch and single-query measurements (same chunks, grouping by tenant and
    budgets), timed by the wall clock and also by this process's CPU time: on a shared machine
    the wall clock counts other jobs' turns on the cores, the CPU time (almost) only ours."""
    from bench.datasets import recall_at_k
    from bench.measure import latency_percentiles
    from bench.worker import _search_grouped

    found, done, wall, cpu = [], 0, 0.0, 0.0
    while done < len(ds.queries) and (done == 0 or wall < spec.batch_budget_s):
        q = ds.queries[done:done + spec.batch_size]
        qt = ds.query_tenants[done:done + len(q)]
        t0, c0 = time.perf_counter(), time.process_time()
        ids = _search_grouped(adapter, q, spec.k, params, qt)
        wall, cpu = wall + time.perf_counter() - t0, cpu + time.process_time() - c0
        found.append(np.asarray(ids)[:, :spec.k])
        done += len(q)
    recall = recall_at_k(np.vstack(found), ds.gt[:done], 10)
    lat: list[float] = []
    single_wall = single_cpu = 0.0
    for i in range(min(spec.single_queries, len(ds.queries))):
        if single_wall > spec.single_budget_s and len(lat) >= spec.min_single:
            break
        t0, c0 = time.perf_counter(), time.process_time()
        adapter.search(ds.queries[i:i + 1], spec.k, params, tenant=str(ds.query_tenants[i]))
        dt = time.perf_counter() - t0
        single_cpu += time.process_time() - c0
        lat.append(dt)
        single_wall += dt
    p50, p99 = latency_percentiles(lat)
    return {"recall_at_10": round(recall, 5), "qps_batch": round(done / wall, 2),
            "qps_single": round(len(lat) / single_wall, 2),
            "cpu_qps_batch": round(done / max(cpu, 1e-9), 2),
            "cpu_qps_single": round(len(lat) / max(single_cpu, 1e-9), 2),
            "p50_ms": None if p50 is None else round(p50, 4), "p99_ms": None if p99 is None else round(p99, 4),
            "queries": done}


def _measure_build(spec: WorkerSpec, cls, ds, sets, tenants, build_params: dict[str, Any], row0: dict) -> None:
    from bench.measure import PeakMemory, anon_bytes, release_free_memory

    workdir = Path(tempfile.mkdtemp(prefix=f"tenants-{spec.algo}-", dir=spec.workdir))
    try:
        adapter = cls(workdir / "index", ds.dim, ds.metric, spec.threads)
        release_free_memory()
        t0 = time.perf_counter()
        with PeakMemory() as build_memory:
            adapter.build(ds.base, build_params, tenants)
        build_s = time.perf_counter() - t0
        adapter.close()
        del adapter
        release_free_memory()
        anon0 = anon_bytes()
        adapter = cls(workdir / "index", ds.dim, ds.metric, spec.threads)
        t0 = time.perf_counter()
        adapter.load(build_params)
        load_s = time.perf_counter() - t0
        peak = anon_bytes()
        for search_params in spec.search_points:
            params = {**build_params, **search_params}
            for (lo, hi), bds in sets:
                adapter.search(bds.queries[:10], spec.k, params, tenant=str(bds.query_tenants[0]))
                got = measure_point(adapter, bds, spec, params)
                peak = max(peak, anon_bytes())
                emit(spec, {**row0, "params": params, "tenant_fraction": [lo, hi], **got,
                            "build_s": round(build_s, 3), "build_peak_bytes": build_memory.peak,
                            "ram_bytes": max(0, peak - anon0), "disk_bytes": adapter.disk_bytes(),
                            "bucket_queries": len(bds.queries), "load_s": round(load_s, 3),
                            "loadavg": round(os.getloadavg()[0], 2)})
        adapter.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m bench.tenant_run SPEC.json", file=sys.stderr)
        return 2
    return measure(WorkerSpec(**json.loads(Path(argv[0]).read_text())))


if __name__ == "__main__":
    sys.exit(main())
