"""bench.spann_scale: the build-scaling lines and the cold/warm labelling of the plot."""

import json
import subprocess
import sys
from pathlib import Path

from bench.spann_scale import label_rows, summary

ROOT = Path(__file__).resolve().parents[2]


def _row(algo, cold, recall, qps, **kw):
    return {"algo": algo, "cold": cold, "recall_at_10": recall, "qps_batch": qps, "qps_single": qps / 2,
            "p50_ms": 1000 / qps, "params": {"p": qps}, "n": 100, "ram_bytes": 1, "disk_bytes": 2, "build_s": 3, **kw}


def test_cold_and_warm_points_of_one_algo_become_two_lines():
    rows = [_row("spann", True, 0.92, 50), _row("spann", False, 0.92, 200), _row("faiss-ivf", False, 0.95, 400)]
    assert [r["algo"] for r in label_rows(rows)] == ["spann cold", "spann warm", "faiss-ivf"]
    lines = {s["line"]: s for s in summary(rows, 0.90)}
    assert lines["spann cold"]["qps_batch"] == 50 and lines["spann warm"]["qps_batch"] == 200
    # a line that never reaches the recall target says so instead of reporting a slower point
    assert summary([_row("x", False, 0.5, 10)], 0.9)[0]["qps_batch"] is None


def test_build_lines_are_written_per_size(tiny_dataset, tmp_path):
    out = tmp_path / "scale.jsonl"
    proc = subprocess.run([sys.executable, "-m", "bench.spann_scale", "build", "--dataset", str(tiny_dataset),
                           "--n", "500", "--n", "2000", "--out", str(out), "--workdir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["n"] for r in lines] == [500, 2000]
    for r in lines:
        assert r["build_cpu_s"] > 0 and r["build_peak_bytes"] >= 0 and r["disk_bytes"] > 0
        assert r["float32_bytes"] == r["n"] * 16 * 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("spann-scale-")]  # temp indexes removed
