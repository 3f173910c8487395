"""`bench prepare-tenants` / `bench tenants` end to end on a tiny tenant dataset: real builds of
every tenant algo, one line per (point, tenant-size bucket), exact per-tenant ground truth."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.algos import TENANT_ALGOS
from bench.cli import main as bench_main
from bench.datasets import load_dataset
from bench.tenant_data import TenantConfig, prepare_tenants
from bench.tenant_run import TenantRunConfig, query_buckets, run_tenants


@pytest.fixture(scope="module")
def tenant_dataset(tiny_dataset, tmp_path_factory):
    return prepare_tenants(TenantConfig(source=tiny_dataset, out=tmp_path_factory.mktemp("t") / "tiny-tenants",
                                        tenants=300, layout="clustered", seed=3))


def test_buckets_partition_the_queries_by_tenant_size(tenant_dataset):
    ds = load_dataset(tenant_dataset)
    buckets = query_buckets(ds)
    rows = np.concatenate([r for _, r in buckets])
    assert sorted(rows.tolist()) == list(range(len(ds.queries))), "every query in exactly one bucket"
    size = np.bincount(ds.base_tenants[1])
    for (lo, hi), r in buckets:
        share = size[ds.query_tenants[r]] / ds.n
        assert ((share >= lo) & (share <= hi)).all()


GRID = {"curator": {"candidate_budget": [64, 100000]}, "per-tenant-ivf": {"nprobe": [64]},
        "shared-ivf-filter": {"nlist": [16], "nprobe": [16]},
        "hnswlib-filter": {"ef": [64]}, "milvus-lite-filter": {"nlist": [16], "nprobe": [16]}}


@pytest.mark.parametrize("algos", [
    ["curator", "per-tenant-ivf", "shared-ivf-filter"],
    # a Python filter callback per visited node, a filter expression over every row: slow
    pytest.param(list(TENANT_ALGOS), marks=pytest.mark.slow)])
def test_tenant_algos_run_per_bucket(tenant_dataset, tmp_path, algos):
    out = tmp_path / "t.jsonl"
    grid = json.dumps({a: GRID[a] for a in algos})
    rows = run_tenants(TenantRunConfig(dataset=tenant_dataset, out=out, algos=algos, param_grid=grid, max_queries=8,
                                       batch_budget_s=0.2, single_budget_s=0.1, single_queries=3,
                                       plot=tmp_path / "t.png"))
    ds = load_dataset(tenant_dataset)
    n_buckets = len(query_buckets(ds))
    skipped = {r["algo"] for r in rows if r.get("skipped")}
    assert all("not importable" in r["skipped"] for r in rows if r.get("skipped")), rows  # absent libraries only
    for algo in set(algos) - skipped:
        mine = [r for r in rows if r["algo"] == algo]
        points = 2 if algo == "curator" else 1
        assert len(mine) == points * n_buckets, (algo, mine)
        assert all(r["tenant_fraction"][0] < r["tenant_fraction"][1] and r["qps_batch"] > 0 and r["cpu_qps_batch"] > 0
                   for r in mine)
    exact = [r for r in rows if r["algo"] == "curator" and r["params"]["candidate_budget"] == 100000]
    assert all(r["recall_at_10"] == 1.0 for r in exact), "a budget over every vector scans each tenant exactly"
    assert (tmp_path / "t.png").stat().st_size > 0 and (tmp_path / "t-cpu.png").stat().st_size > 0


def test_cli_prepare_tenants_and_plot(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "rt"
    assert bench_main(["prepare-tenants", str(tiny_dataset), "--out", str(out), "--layout", "random",
                       "--tenants", "30"]) == 0
    assert "30 tenants" in capsys.readouterr().out
    assert bench_main(["tenants", "--dataset", str(out), "--algo", "curator", "--out", str(tmp_path / "r.jsonl"),
                       "--param-grid", '{"candidate_budget": [128]}', "--max-queries", "5",
                       "--batch-budget", "0.1", "--single-budget", "0.1"]) == 0
    table = capsys.readouterr().out
    assert "| glove" not in table and "curator" in table
    assert bench_main(["plot", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "r.png")]) == 0
    assert (tmp_path / "r.png").exists()
    assert bench_main(["prepare-tenants", str(tiny_dataset), "--out", str(out), "--tenants", "0"]) == 2
