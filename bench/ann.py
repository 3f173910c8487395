"""The ANN benchmark runner: each algo in its own process, one JSON line per parameter point.

    python -m bench.ann --dataset DIR --algo faiss-ivf --algo flat --out runs/r.jsonl
    datastore bench ann ...   (the same command, mounted in the datastore CLI)

Running each algo in a fresh process keeps peers from polluting each other's resident
memory and thread pools, and lets a crashing peer be recorded instead of ending the run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import click

from bench.worker import WorkerSpec, base_row

_PROJECT_ROOT = Path(__file__).resolve().parent.parent


class BenchError(click.ClickException):
    """Bad input to a bench command: printed as one line, exit code 2."""

    exit_code = 2


@dataclass
class RunConfig:
    """Everything one `bench ann` invocation needs; the CLI only fills this in."""

    dataset: Path
    algos: list[str]
    out: Path
    param_grid: str | None = None
    threads: int = 1
    cold: bool = False
    k: int = 10
    batch_size: int = 1000
    batch_budget_s: float = 60.0
    single_queries: int = 1000
    single_budget_s: float = 5.0
    max_queries: int | None = None
    workdir: Path | None = None
    timeout_s: float = 3600.0
    plot: Path | None = None
    log: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.algos:
            raise ValueError("algos: give at least one --algo")
        if self.threads not in (1, 2):
            raise ValueError(f"threads must be 1 or 2, got {self.threads}")
        if not 1 <= self.k <= 100:
            raise ValueError(f"k must be in 1..100 (the ground truth holds 100), got {self.k}")
        for name in ("batch_size", "single_queries"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_queries is not None and self.max_queries <= 0:
            raise ValueError(f"max_queries must be positive, got {self.max_queries}")


def plan(config: RunConfig) -> dict[str, tuple[list[dict], list[dict]] | str]:
    """Per algo, its (build points, search points), or the reason it cannot run. Raises on bad input."""
    from bench.algos import NotYetAvailable, UnknownAlgo, grid_for, parse_grid_option, resolve

    tenants = (Path(config.dataset) / "query_tenants.npy").exists()  # tenant datasets have their own grids

    overrides, shared = parse_grid_option(config.param_grid, config.algos)
    shared = shared and len(set(config.algos)) > 1
    out: dict[str, tuple[list[dict], list[dict]] | str] = {}
    used_keys: set[str] = set()
    for algo in dict.fromkeys(config.algos):
        try:
            cls = resolve(algo)
        except UnknownAlgo as e:
            raise ValueError(str(e)) from None
        except NotYetAvailable as e:
            out[algo] = str(e)
            continue
        ov = overrides.get(algo, {})
        out[algo] = grid_for(algo, cls, ov, lenient=shared, tenants=tenants)
        used_keys |= {k for b, s in [out[algo]] for p in (b + s) for k in p}
    if shared:
        unknown = set(overrides[config.algos[0]]) - used_keys
        if unknown:
            raise ValueError(f"--param-grid keys {sorted(unknown)} are taken by none of {', '.join(config.algos)}")
    return out


def run_ann(config: RunConfig, echo=None) -> list[dict[str, Any]]:
    """Run every algo of `config`, appending result lines to config.out; returns this run's lines."""
    from bench.datasets import load_dataset

    echo = echo or (lambda msg: print(msg, file=sys.stderr, flush=True))
    points = plan(config)
    ds = load_dataset(config.dataset, max_queries=config.max_queries)  # validates, caches gt.npy once
    config.out.parent.mkdir(parents=True, exist_ok=True)
    start_line = _count_lines(config.out)
    log_path = config.log or config.out.with_suffix(".log")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(_PROJECT_ROOT),
                                                                    os.environ.get("PYTHONPATH")]))}
    from bench.measure import thread_env

    env.update(thread_env(config.threads))
    for algo, planned in points.items():
        if isinstance(planned, str):
            _append(config.out, {**base_row(_spec(config, algo, [], []), ds.name, ds.n, ds.dim), "skipped": planned})
            echo(f"{algo}: skipped ({planned})")
            continue
        build_points, search_points = planned
        spec = _spec(config, algo, build_points, search_points)
        echo(f"{algo}: {len(build_points)} build(s) x {len(search_points)} search point(s) ...")
        before = _count_lines(config.out)
        t0 = time.perf_counter()
        rc, reason = _run_worker(spec, env, log_path, config.timeout_s)
        got = _count_lines(config.out) - before
        if rc != 0 and got == 0:
            _append(config.out, {**base_row(spec, ds.name, ds.n, ds.dim), "skipped": reason})
        echo(f"{algo}: {got} line(s) in {time.perf_counter() - t0:.0f}s" + (f"; {reason}" if rc else ""))
    rows = read_results(config.out)[start_line:]
    if config.plot is not None:
        from bench.plot import plot_recall_qps

        plot_recall_qps(rows, config.plot)
    return rows


def _spec(config: RunConfig, algo: str, build_points, search_points) -> WorkerSpec:
    return WorkerSpec(algo=algo, dataset=str(config.dataset), out=str(config.out), build_points=build_points,
                      search_points=search_points, k=config.k, threads=config.threads, cold=config.cold,
                      batch_size=config.batch_size, batch_budget_s=config.batch_budget_s,
                      single_queries=config.single_queries, single_budget_s=config.single_budget_s,
                      max_queries=config.max_queries,
                      workdir=None if config.workdir is None else str(config.workdir))


def _run_worker(spec: WorkerSpec, env: dict[str, str], log_path: Path, timeout_s: float,
                module: str = "bench.worker") -> tuple[int, str]:
    """Run one worker (`python -m module SPEC.json`); (exit code, one-line reason when it failed)."""
    # The worker builds under a dir we own, so that a killed worker leaves no index behind.
    scratch = Path(tempfile.mkdtemp(prefix=f"bench-{spec.algo}-", dir=spec.workdir))
    spec = replace(spec, workdir=str(scratch))
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(asdict(spec), f)
        spec_path = f.name
    try:
        with open(log_path, "a") as log:
            log.write(f"\n===== {spec.algo} {time.strftime('%Y-%m-%d %H:%M:%S')} =====\n")
            log.flush()
            offset = log.tell()
            proc = subprocess.Popen([sys.executable, "-m", module, spec_path], stdout=log,
                                    stderr=subprocess.STDOUT, env=env, cwd=str(_PROJECT_ROOT))
            try:
                rc = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                return -9, f"failed: no result within --timeout {timeout_s:.0f}s"
        if rc == 0:
            return 0, ""
        return rc, f"failed: worker exited {rc}: {_last_error(log_path, offset)}"
    finally:
        os.unlink(spec_path)
        shutil.rmtree(scratch, ignore_errors=True)


def _last_error(log_path: Path, offset: int) -> str:
    """The worker's last line of output (its own part of the shared log only)."""
    with open(log_path, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no output"


def _count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path) as f:
        return sum(1 for _ in f)


def _append(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_results(path: Path) -> list[dict[str, Any]]:
    """Result lines of a JSONL file (blank lines ignored)."""
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n} is not a JSON line ({e.msg})") from None
    return rows


@click.command("ann")
@click.option("--dataset", "dataset", required=True, type=click.Path(path_type=Path),
              help="Dataset directory (base.npy, queries.npy, dataset.json[, gt.npy]).")
@click.option("--algo", "algos", multiple=True, required=True,
              help="Algorithm to run; repeat for several (flat, faiss-ivf, hnswlib, diskann, ...).")
@click.option("--param-grid", default=None, help='JSON grid, e.g. \'{"nprobe": [1, 4, 16, 64]}\' or per algo.')
@click.option("--threads", type=click.Choice(["1", "2"]), default="1", show_default=True)
@click.option("--cold", is_flag=True, help="Drop the page cache of the index files before the queries.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="JSONL file results are appended to.")
@click.option("--plot", type=click.Path(path_type=Path), default=None, help="Write a recall-vs-QPS PNG here.")
@click.option("--k", default=10, show_default=True, type=int)
@click.option("--max-queries", type=int, default=None, help="Use only the first N queries.")
@click.option("--batch-budget", "batch_budget_s", default=60.0, show_default=True,
              help="Seconds of batch search per point before stopping early (recall on the queries done).")
@click.option("--single-budget", "single_budget_s", default=5.0, show_default=True,
              help="Seconds of one-at-a-time queries per point.")
@click.option("--single-queries", default=1000, show_default=True, help="At most this many single queries.")
@click.option("--workdir", type=click.Path(path_type=Path), default=None, help="Where indexes are built (temp).")
@click.option("--timeout", "timeout_s", default=3600.0, show_default=True, help="Seconds per algo.")
def ann(dataset: Path, algos: tuple[str, ...], param_grid: str | None, threads: str, cold: bool, out: Path,
        plot: Path | None, k: int, max_queries: int | None, batch_budget_s: float, single_budget_s: float,
        single_queries: int, workdir: Path | None, timeout_s: float) -> None:
    """Recall@10, batch and single-query QPS, latency, build time, RAM and disk per parameter point."""
    from bench.plot import pareto_markdown

    try:
        config = RunConfig(dataset=dataset, algos=list(algos), out=out, param_grid=param_grid, threads=int(threads),
                           cold=cold, k=k, max_queries=max_queries, batch_budget_s=batch_budget_s,
                           single_budget_s=single_budget_s, single_queries=single_queries, workdir=workdir,
                           timeout_s=timeout_s, plot=plot)
        if workdir is not None:
            workdir.mkdir(parents=True, exist_ok=True)
        rows = run_ann(config, echo=lambda m: click.echo(m, err=True))
    except ValueError as e:  # includes DatasetError / InvalidArgument
        raise BenchError(_one_line(e)) from None
    click.echo(pareto_markdown(rows))


def _one_line(e: BaseException) -> str:
    hint = getattr(e, "hint", "")
    msg = " ".join(str(e).split())
    return f"{msg} ({hint})" if hint else msg


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m bench.ann`; returns the exit code."""
    try:
        ann.main(args=argv, prog_name="python -m bench.ann", standalone_mode=False)
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Abort:
        return 1
    except click.exceptions.Exit as e:
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
