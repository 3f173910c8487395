"""`bench` command group: `ann` runs, `prepare` writes datasets, `plot` redraws a results file.

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


@bench.command("plot")
@click.argument("results", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="PNG to write.")
@click.option("--single", is_flag=True, help="Plot single-query QPS instead of batch QPS.")
def plot(results: Path, out: Path, single: bool) -> None:
    """Redraw the recall-vs-QPS plot of RESULTS and print its Pareto table."""
    from bench.plot import pareto_markdown, plot_recall_qps

    try:
        rows = read_results(results)
    except ValueError as e:
        raise BenchError(_one_line(e)) from None
    plot_recall_qps(rows, out, "qps_single" if single else "qps_batch")
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
