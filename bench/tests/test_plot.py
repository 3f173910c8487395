from bench.plot import pareto, pareto_markdown, qps_at


def _row(algo, recall, qps, **kw):
    return {"algo": algo, "params": kw, "recall_at_10": recall, "qps_batch": qps, "qps_single": qps / 2,
            "p50_ms": 1.0, "p99_ms": 2.0, "ram_bytes": 10**6, "disk_bytes": 2 * 10**6, "build_s": 1.0}


def test_pareto_keeps_only_undominated_points_by_recall():
    rows = [_row("a", 0.5, 100, p=1), _row("a", 0.6, 50, p=2), _row("a", 0.55, 40, p=3), _row("a", 0.9, 10, p=4)]
    assert [r["params"]["p"] for r in pareto(rows)] == [1, 2, 4]


def test_qps_at_threshold_and_table():
    rows = [_row("a", 0.91, 100, p=1), _row("a", 0.96, 50, p=2), _row("b", 0.8, 1000, p=1),
            {"algo": "c", "skipped": "not installed"}]
    assert qps_at(rows[:2], 0.90)["params"] == {"p": 1} and qps_at(rows[:2], 0.95)["params"] == {"p": 2}
    assert qps_at(rows[2:3], 0.9) is None
    md = pareto_markdown(rows)
    assert "| c | skipped: not installed |" in md and "not reached" in md
