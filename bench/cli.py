"""`bench` command group: `ann` runs, `prepare` writes datasets, `plot` redraws a results file;
`prepare-tenants` and `tenants` are the multi-tenant benchmark (bench.tenant_data, bench.tenant_run).

Mounted in the datastore CLI as `datastore bench`; usable alone as `python -m bench.cli`.
Bad input prints one line and exits 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from bench.ann import BenchError, _one_line, ann, read_results


@click.group("bench")
def bench() -> None:
    """Benchmarks: datasets, ANN recall/speed/memory against peers, plots."""


bench.add_command(ann)


@bench.command("prepare")
@click.argument("name", type=click.Choice(["glove-50", "wiki-minilm", "synthetic"]))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Dataset directory to write.")
@click.option("--n", type=int, default=None, help="synthetic: base vectors (default 1,000,000).")
@click.option("--dim", type=int, default=None, help="synthetic: dimension (default 128).")
@click.option("--queries", type=int, default=None, help="Queries (glove 10,000; synthetic 10,000; wiki 200).")
@click.option("--clusters", type=int, default=None, help="synthetic: number of clusters (default ~sqrt(n)).")
@click.option("--metric", type=click.Choice(["l2", "ip", "cos"]), default=None, help="synthetic: metric (l2).")
@click.option("--limit", type=int, default=None, help="wiki-minilm: only the first N articles.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-gt", is_flag=True, help="Do not compute gt.npy now (it is computed on first use).")
def prepare(name: str, out: Path, n: int | None, dim: int | None, queries: int | None, clusters: int | None,
            metric: str | None, limit: int | None, seed: int, no_gt: bool) -> None:
    """Write dataset NAME (glove-50, wiki-minilm or synthetic) to --out."""
    from bench import prepare as prep

    given = {"--n": n, "--dim": dim, "--clusters": clusters, "--metric": metric, "--limit": limit}
    allowed = {"glove-50": set(), "synthetic": {"--n", "--dim", "--clusters", "--metric"},
               "wiki-minilm": {"--limit"}}[name]
    wrong = sorted(k for k, v in given.items() if v is not None and k not in allowed)
    if wrong:
        raise BenchError(f"{', '.join(wrong)} do(es) not apply to {name}; it takes: "
                         f"{', '.join(sorted(allowed | {'--queries', '--seed'}))}")
    try:
        if name == "glove-50":
            cfg = prep.GloveConfig(out=out, seed=seed, **({"queries": queries} if queries else {}))
            path = prep.prepare_glove(cfg)
        elif name == "synthetic":
            kw = {k: v for k, v in {"n": n, "dim": dim, "queries": queries, "clusters": clusters,
                                    "metric": metric}.items() if v is not None}
            path = prep.prepare_synthetic(prep.SyntheticConfig(out=out, seed=seed, **kw))
        else:
            kw = {k: v for k, v in {"limit": limit, "queries": queries}.items() if v is not None}
            path = prep.prepare_wiki(prep.WikiConfig(out=out, seed=seed, **kw),
                                     progress=lambda d, t: click.echo(f"embedded {d}/{t}", err=True))
        summary = f"wrote {path}" if no_gt else prep.verify(path)
    except ValueError as e:
        raise BenchError(_one_line(e)) from None
    click.echo(summary)


@bench.command("prepare-tenants")
@click.argument("source", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Dataset directory to write.")
@click.option("--layout", type=click.Choice(["clustered", "random"]), default="clustered", show_default=True,
              help="clustered: a tenant's vectors are neighbours; random: drawn anywhere.")
@click.option("--tenants", "n_tenants", type=int, default=10_000, show_default=True)
@click.option("--zipf", type=float, default=1.0, show_default=True, help="Exponent of the tenant-size law.")
@click.option("--max-per-vector", type=int, default=3, show_default=True, help="Tenants per vector: 1..this.")
@click.option("--public", type=float, default=0.0, show_default=True, help="Share of vectors visible to all.")
@click.option("--seed", type=int, default=0, show_default=True)
def prepare_tenants_cmd(source: Path, out: Path, layout: str, n_tenants: int, zipf: float, max_per_vector: int,
                        public: float, seed: int) -> None:
    """Lay Zipf-sized tenants over dataset SOURCE (e.g. data/glove-50) into --out."""
    import numpy as np

    from bench.datasets import load_dataset
    from bench.tenant_data import TenantConfig, prepare_tenants

    try:
        path = prepare_tenants(TenantConfig(source=source, out=out, layout=layout, tenants=n_tenants, zipf=zipf,
                                            max_per_vector=max_per_vector, public=public, seed=seed))
        ds = load_dataset(path)  # computes and caches the tenant-filtered ground truth
    except ValueError as e:
        raise BenchError(_one_line(e)) from None
    click.echo(f"wrote {path}: {ds.n} vectors, {len(np.unique(ds.base_tenants[1]))} tenants, "
               f"{len(ds.queries)} queries")


@bench.command("tenants")
@click.option("--dataset", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="A tenant dataset from `bench prepare-tenants`.")
@click.option("--algo", "algos", multiple=True,
              help="Algo to run, repeatable (default: curator, per-tenant-ivf, shared-ivf-filter, "
                   "hnswlib-filter, milvus-lite-filter).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="JSONL file results are appended to.")
@click.option("--param-grid", default=None, help="JSON grid replacing the tenant defaults (bench.algos.TENANT_GRIDS).")
@click.option("--plot", type=click.Path(path_type=Path), default=None, help="Write a QPS-vs-tenant-size PNG here.")
@click.option("--max-queries", type=int, default=1000, show_default=True, help="Queries per tenant-size bucket.")
@click.option("--batch-budget", "batch_budget_s", default=5.0, show_default=True, help="Seconds per point and bucket.")
@click.option("--single-budget", "single_budget_s", default=1.5, show_default=True,
              help="Seconds of one-at-a-time queries per point and bucket.")
@click.option("--timeout", "timeout_s", default=3600.0, show_default=True, help="Seconds per algo.")
def tenants_cmd(dataset: Path, algos: tuple[str, ...], out: Path, param_grid: str | None, plot: Path | None,
                max_queries: int, batch_budget_s: float, single_budget_s: float, timeout_s: float) -> None:
    """Per tenant-size bucket: recall@10, QPS, latency and RAM of each algo (one line per point and bucket)."""
    from bench.plot import tenant_markdown
    from bench.tenant_run import TenantRunConfig, run_tenants

    try:
        config = TenantRunConfig(dataset=dataset, out=out, algos=list(algos), param_grid=param_grid, plot=plot,
                                 max_queries=max_queries, batch_budget_s=batch_budget_s,
                                 single_budget_s=single_budget_s, timeout_s=timeout_s)
        rows = run_tenants(config, echo=lambda m: click.echo(m, err=True))
    except ValueError as e:
        raise BenchError(_one_line(e)) from None
    click.echo(tenant_markdown(rows) + "\n\n" + tenant_markdown(rows, "cpu_qps_batch"))


@bench.command("plot")
@click.argument("results", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="PNG to write.")
@click.option("--single", is_flag=True, help="Plot single-query QPS instead of batch QPS.")
@click.option("--cpu", is_flag=True, help="Tenant runs: QPS by CPU time (cpu_qps_*) instead of the wall clock.")
def plot(results: Path, out: Path, single: bool, cpu: bool) -> None:
    """Redraw the plot of RESULTS and print its tables: recall vs QPS, or, for `bench tenants`
    results, QPS vs tenant size."""
    from bench.plot import pareto_markdown, plot_recall_qps, plot_tenant_qps, tenant_markdown

    try:
        rows = read_results(results)
    except ValueError as e:
        raise BenchError(_one_line(e)) from None
    qps_key = ("cpu_" if cpu else "") + ("qps_single" if single else "qps_batch")
    if any("tenant_fraction" in r for r in rows):
        plot_tenant_qps(rows, out, qps_key)
        click.echo(tenant_markdown(rows, qps_key))
        return
    if cpu:
        raise BenchError("--cpu applies to `bench tenants` results only (they carry cpu_qps_*)")
    plot_recall_qps(rows, out, qps_key)
    click.echo(pareto_markdown(rows))


def main(argv: list[str] | None = None) -> int:
    try:
        bench.main(args=argv, prog_name="bench", standalone_mode=False)
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
