"""Large-set helpers for the SPANN benchmark (issue 4), on top of the ANN harness.

    python -m bench.spann_scale build --dataset DIR --n 1000000 --n 4000000 --out runs/scale.jsonl
        Build SPANN on the first N base rows for each N, each in a fresh process pinned to one
        CPU; one JSON line per N: wall and CPU seconds, peak anonymous memory growth during the
        build, peak RSS, disk bytes. Linear scaling means cpu_s / n and peak stay flat.

    python -m bench.spann_scale ann --dataset DIR --algo spann --param-grid JSON --out runs/r.jsonl
        One `bench ann` worker per algo that measures every point cold and then warm from the
        same build (WorkerSpec.extra["then_warm"]): a multi-million index is built once.

Rows of a synthetic set are drawn independently from one mixture, so a prefix of a large set
is a sample of the same distribution: one file serves every size.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import click
import numpy as np


@dataclass
class ScaleConfig:
    dataset: Path
    n: int
    out: Path
    workdir: Path | None = None
    params: str | None = None  # JSON object of SpannConfig fields

    def __post_init__(self) -> None:
        if self.n <= 0:
            raise ValueError(f"n must be positive, got {self.n}")


def build_once(cfg: ScaleConfig) -> dict:
    """Build SPANN on the first cfg.n rows in this process; returns the result line."""
    import resource

    from bench.datasets import normalise, read_meta
    from bench.measure import PeakMemory, disk_bytes, pin_threads, release_free_memory
    from index.registry import create_index

    pin_threads(1)
    meta = read_meta(cfg.dataset)  # no load_dataset: a build needs neither queries nor ground truth
    base = np.load(Path(cfg.dataset) / "base.npy", mmap_mode="r")
    if cfg.n > len(base):
        raise ValueError(f"{cfg.dataset} has {len(base)} base rows, fewer than n={cfg.n}")
    base = base[:cfg.n]  # a memory-mapped view: the rows are read as the build streams them
    metric = "ip" if meta["metric"] == "cos" else meta["metric"]
    unit = meta["metric"] != "cos" or meta.get("normalised")
    rows = (lambda a, b: base[a:b]) if unit else (lambda a, b: normalise(base[a:b]))
    params = json.loads(cfg.params) if cfg.params else {}
    work = Path(tempfile.mkdtemp(prefix="spann-scale-", dir=cfg.workdir))
    try:
        release_free_memory()
        t0 = time.perf_counter()
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        with PeakMemory() as peak:
            index = create_index("spann", base.shape[1], metric, **params)
            index.train(base if unit else rows(0, min(cfg.n, index.config.train_sample)))
            for start in range(0, cfg.n, 1 << 17):  # adds in slices, as an ingest would
                stop = min(cfg.n, start + (1 << 17))
                index.add(np.arange(start, stop, dtype=np.int64), rows(start, stop))
            index.save(work / "index")
        wall = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        row = {"algo": "spann", "dataset": meta["name"], "n": cfg.n, "dim": base.shape[1], "params": params,
               "build_s": round(wall, 2),
               "build_cpu_s": round(ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime, 2),
               "build_peak_bytes": peak.peak, "maxrss_bytes": ru1.ru_maxrss * 1024,
               "disk_bytes": disk_bytes([work / "index"]), "float32_bytes": cfg.n * base.shape[1] * 4,
               "loadavg": round(os.getloadavg()[0], 2), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        scratch = getattr(index, "_scratch", None)
        del index
        if scratch is not None:  # the standalone index's private LMDB, copied into work by save
            shutil.rmtree(scratch, ignore_errors=True)
        return row
    finally:
        shutil.rmtree(work, ignore_errors=True)


@click.group()
def cli() -> None:
    """SPANN benchmark helpers for multi-million sets."""


@cli.command("build")
@click.option("--dataset", required=True, type=click.Path(path_type=Path))
@click.option("--n", "sizes", type=int, multiple=True, required=True, help="Base rows to build on; repeat.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="JSONL file lines are appended to.")
@click.option("--workdir", type=click.Path(path_type=Path), default=None)
@click.option("--params", default=None, help="JSON object of SpannConfig fields.")
def build_cmd(dataset: Path, sizes: tuple[int, ...], out: Path, workdir: Path | None, params: str | None) -> None:
    """Build time and memory of SPANN at each --n, one fresh process per size."""
    out.parent.mkdir(parents=True, exist_ok=True)
    failed = []
    for n in sizes:
        cfg = ScaleConfig(dataset=dataset, n=n, out=out, workdir=workdir, params=params)
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump({k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}, f)
            spec = f.name
        try:
            rc = subprocess.call([sys.executable, "-m", "bench.spann_scale", "_one", spec])
        finally:
            os.unlink(spec)
        click.echo(f"n={n}: exit {rc}", err=True)
        if rc:
            failed.append(n)
    if failed:
        raise click.ClickException(f"builds failed for n={failed} (see the output above)")


@cli.command("_one", hidden=True)
@click.argument("spec", type=click.Path(path_type=Path))
def one_cmd(spec: Path) -> None:
    raw = json.loads(spec.read_text())
    cfg = ScaleConfig(**{k: (Path(v) if k in ("dataset", "out", "workdir") and v else v) for k, v in raw.items()})
    row = build_once(cfg)
    with open(cfg.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    click.echo(json.dumps(row))


@cli.command("ann")
@click.option("--dataset", required=True, type=click.Path(path_type=Path))
@click.option("--algo", "algos", multiple=True, required=True)
@click.option("--param-grid", default=None)
@click.option("--out", required=True, type=click.Path(path_type=Path))
@click.option("--batch-budget", "batch_budget_s", default=60.0)
@click.option("--single-budget", "single_budget_s", default=5.0)
@click.option("--single-queries", default=1000)
@click.option("--workdir", type=click.Path(path_type=Path), default=None)
@click.option("--timeout", "timeout_s", default=3600.0)
def ann_cmd(dataset: Path, algos: tuple[str, ...], param_grid: str | None, out: Path, batch_budget_s: float,
            single_budget_s: float, single_queries: int, workdir: Path | None, timeout_s: float) -> None:
    """Like `bench ann --cold`, then the same points warm, from one build per algo."""
    from bench import ann
    from bench.measure import thread_env

    config = ann.RunConfig(dataset=dataset, algos=list(algos), out=out, param_grid=param_grid, cold=True,
                           batch_budget_s=batch_budget_s, single_budget_s=single_budget_s,
                           single_queries=single_queries, workdir=workdir, timeout_s=timeout_s)
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **thread_env(1),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                       os.environ.get("PYTHONPATH")]))}
    for algo, planned in ann.plan(config).items():
        if isinstance(planned, str):
            click.echo(f"{algo}: skipped ({planned})", err=True)
            continue
        spec = replace(ann._spec(config, algo, *planned), extra={"then_warm": True})
        t0 = time.perf_counter()
        rc, reason = ann._run_worker(spec, env, out.with_suffix(".log"), timeout_s)
        click.echo(f"{algo}: exit {rc} in {time.perf_counter() - t0:.0f}s {reason}", err=True)


def label_rows(rows: list[dict]) -> list[dict]:
    """Rows with cold and warm points of one algo told apart ("spann cold", "spann warm")."""
    modes: dict[str, set] = {}
    for r in rows:
        modes.setdefault(r["algo"], set()).add(bool(r.get("cold")))
    return [{**r, "algo": f"{r['algo']} {'cold' if r.get('cold') else 'warm'}"} if len(modes[r["algo"]]) > 1
            or r.get("cold") else r for r in rows]


def summary(rows: list[dict], recall: float = 0.90) -> list[dict]:
    """Per line, the fastest measured point reaching `recall` (no interpolation)."""
    from bench.plot import by_algo, measured, qps_at

    out = []
    for algo, pts in sorted(by_algo(measured(label_rows(rows))).items()):
        best = qps_at(pts, recall)
        single = qps_at(pts, recall, "qps_single")
        out.append({"line": algo, "n": pts[0].get("n"), "recall_target": recall,
                    "params": best and best["params"], "recall_at_10": best and best["recall_at_10"],
                    "qps_batch": best and best["qps_batch"], "qps_single": single and single["qps_single"],
                    "p50_ms": single and single["p50_ms"], "ram_bytes": best and best["ram_bytes"],
                    "disk_bytes": best and best["disk_bytes"], "build_s": best and best["build_s"],
                    "build_cpu_s": best and best.get("build_cpu_s"), "loadavg": best and best.get("loadavg")})
    return out


@cli.command("plot")
@click.argument("results", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path))
@click.option("--single", is_flag=True, help="Single-query QPS instead of batch QPS.")
@click.option("--recall", default=0.90, show_default=True, help="Recall of the summary lines printed.")
def plot_cmd(results: tuple[Path, ...], out: Path, single: bool, recall: float) -> None:
    """One recall-QPS plot of several results files; prints each line's fastest point at --recall."""
    from bench.ann import read_results
    from bench.plot import plot_recall_qps

    rows = [r for path in results for r in read_results(path)]
    plot_recall_qps(label_rows(rows), out, "qps_single" if single else "qps_batch")
    for line in summary(rows, recall):
        click.echo(json.dumps(line))


if __name__ == "__main__":
    cli()
