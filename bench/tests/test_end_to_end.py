"""One tiny run through the real runner (subprocess workers), CLI and plot."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from bench.ann import RunConfig, read_results, run_ann
from bench.cli import bench
from bench.plot import pareto_markdown

FIELDS = ["algo", "params", "dataset", "n", "dim", "k", "recall_at_10", "qps_batch", "qps_single", "p50_ms",
          "p99_ms", "build_s", "ram_bytes", "disk_bytes", "threads", "cold"]
ROOT = Path(__file__).resolve().parents[2]


def test_exact_algos_give_full_recall_and_valid_lines(tiny_dataset, tmp_path):
    out = tmp_path / "r.jsonl"
    has_mpl = importlib.util.find_spec("matplotlib") is not None  # the bench extra; dev installs may lack it
    rows = run_ann(RunConfig(dataset=tiny_dataset, algos=["faiss-flat", "flat", "faiss-ivf"], out=out,
                             param_grid='{"faiss-ivf": {"nlist": [8], "nprobe": [1, 8]}}',
                             single_queries=20, single_budget_s=0.5, plot=tmp_path / "p.png" if has_mpl else None),
                   echo=lambda m: None)
    assert rows == read_results(out)
    by = {}
    for r in rows:
        assert list(r)[:len(FIELDS)] == FIELDS, r
        json.dumps(r)
        by.setdefault(r["algo"], []).append(r)
    for algo in ("faiss-flat", "flat"):
        (r,) = by[algo]
        assert r["recall_at_10"] == 1.0
        assert r["n"] == 2000 and r["dim"] == 16 and r["k"] == 10 and r["threads"] == 1 and r["cold"] is False
        assert r["qps_batch"] > 0 and r["qps_single"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"]
        assert r["disk_bytes"] >= 2000 * 16 * 4 and r["ram_bytes"] >= 0 and r["build_s"] >= 0
    ivf = sorted(by["faiss-ivf"], key=lambda r: r["params"]["nprobe"])
    assert ivf[0]["params"] == {"nlist": 8, "nprobe": 1} and ivf[1]["recall_at_10"] == 1.0
    if has_mpl:
        assert (tmp_path / "p.png").stat().st_size > 10_000
    assert "| flat |" in pareto_markdown(rows)


def test_missing_peer_or_kind_is_reported_not_dropped(tiny_dataset, tmp_path):
    from index.registry import INDEX_KINDS

    missing = [k for k in ("spann", "curator", "binary") if k not in INDEX_KINDS]
    if not missing:
        return
    rows = run_ann(RunConfig(dataset=tiny_dataset, algos=missing[:1], out=tmp_path / "s.jsonl"),
                   echo=lambda m: None)
    assert rows[0]["algo"] == missing[0] and "INDEX_KINDS" in rows[0]["skipped"]


def test_bad_input_is_one_line_and_exit_2(tiny_dataset, tmp_path):
    runner = CliRunner()
    cases = [
        ["ann", "--dataset", str(tmp_path / "none"), "--algo", "flat", "--out", str(tmp_path / "o.jsonl")],
        ["ann", "--dataset", str(tiny_dataset), "--algo", "nope", "--out", str(tmp_path / "o.jsonl")],
        ["ann", "--dataset", str(tiny_dataset), "--algo", "faiss-ivf", "--param-grid", "{bad",
         "--out", str(tmp_path / "o.jsonl")],
        ["prepare", "glove-50", "--out", str(tmp_path / "g"), "--dim", "3"],
    ]
    for args in cases:
        res = runner.invoke(bench, args)
        assert res.exit_code == 2, (args, res.output)
        assert len(res.output.strip().splitlines()) == 1 and res.output.startswith("Error:"), res.output


def test_python_dash_m_bench_ann(tiny_dataset, tmp_path):
    out = tmp_path / "m.jsonl"
    proc = subprocess.run([sys.executable, "-m", "bench.ann", "--dataset", str(tiny_dataset), "--algo", "faiss-flat",
                           "--out", str(out), "--single-queries", "10"], check=False, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| faiss-flat |" in proc.stdout
    assert read_results(out)[0]["recall_at_10"] == 1.0
