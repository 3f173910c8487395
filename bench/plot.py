"""Recall-vs-QPS plot and the Pareto table of a results file; QPS-vs-tenant-size for tenant runs.

The plot follows ann-benchmarks: per algo, the points no other point of that algo beats
on both recall and QPS, joined by a line, on a log QPS axis. Tenant runs (lines with
`tenant_fraction`) are drawn per tenant-size bucket instead: each algo's fastest point at
recall@10 >= 0.9 in each bucket.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

RECALL_THRESHOLDS = (0.90, 0.95)


def measured(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if not r.get("skipped") and r.get("recall_at_10") is not None and r.get("qps_batch")]


def pareto(rows: list[dict[str, Any]], qps_key: str = "qps_batch") -> list[dict[str, Any]]:
    """Points not dominated in (recall, QPS), by increasing recall."""
    best: list[dict[str, Any]] = []
    for r in sorted(rows, key=lambda r: (-r["recall_at_10"], -r[qps_key])):
        if not best or r[qps_key] > best[-1][qps_key]:
            best.append(r)
    return best[::-1]


def by_algo(rows: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["algo"], []).append(r)
    return out


def qps_at(rows: list[dict[str, Any]], recall: float, qps_key: str = "qps_batch") -> dict[str, Any] | None:
    """The fastest point reaching `recall`, or None."""
    ok = [r for r in rows if r["recall_at_10"] >= recall and r.get(qps_key)]
    return max(ok, key=lambda r: r[qps_key]) if ok else None


def plot_recall_qps(rows: list[dict[str, Any]], path: Path, qps_key: str = "qps_batch") -> Path:
    """Write a PNG of recall@10 (x) against QPS (log y), one line per algo."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.algos import OUR_KINDS

    good = measured(rows)
    fig, ax = plt.subplots(figsize=(11.5, 6.5), dpi=120)
    markers = "osD^v<>pPhX*"
    peer_colours = plt.get_cmap("tab20").colors[::2] + plt.get_cmap("tab20").colors[1::2]  # 20 distinct
    our_colours = ("black", "crimson", "darkgreen", "navy", "darkgoldenrod")
    n_ours = n_peers = 0
    for i, (algo, pts) in enumerate(sorted(by_algo(good).items())):
        front = pareto(pts, qps_key)
        ours = algo in OUR_KINDS  # our indexes drawn heavier and darker, so they read at a glance
        if ours:
            colour, n_ours = our_colours[n_ours % len(our_colours)], n_ours + 1
        else:
            colour, n_peers = peer_colours[n_peers % len(peer_colours)], n_peers + 1
        line, = ax.plot([r["recall_at_10"] for r in front], [r[qps_key] for r in front],
                        marker=markers[i % len(markers)], markersize=6 if ours else 5,
                        linewidth=2.6 if ours else 1.5, color=colour,
                        label=f"{algo} (ours)" if ours else algo, zorder=3 if ours else 2)
        others = [r for r in pts if r not in front]
        if others:  # dominated points, faint, so no measurement is hidden
            ax.scatter([r["recall_at_10"] for r in others], [r[qps_key] for r in others], s=10,
                       color=line.get_color(), alpha=0.3)
    ax.set_yscale("log")
    ax.set_xlabel("recall@10")
    ax.set_ylabel("queries per second (" + ("batch" if qps_key == "qps_batch" else "one at a time") + ", log)")
    lo = min((r["recall_at_10"] for r in good), default=0.0)
    ax.set_xlim(max(0.0, min(0.5, lo) - 0.02), 1.005)
    for t in RECALL_THRESHOLDS:
        ax.axvline(t, color="grey", linewidth=0.6, linestyle=":")
    ax.grid(True, which="both", linewidth=0.3, alpha=0.5)
    first = good[0] if good else {}
    title = f"{first.get('dataset', '?')}: n={first.get('n')}, d={first.get('dim')}, k={first.get('k')}, " \
            f"threads={first.get('threads')}" + (", cold cache" if first.get("cold") else "")
    ax.set_title(title)
    skipped = sorted({r["algo"] for r in rows if r.get("skipped")} - {r["algo"] for r in good})
    if skipped:
        ax.text(0.01, 0.01, "skipped: " + ", ".join(skipped), transform=ax.transAxes, fontsize=8, color="grey")
    ax.legend(loc="upper left", fontsize=9, bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _mb(x: Any) -> str:
    return "-" if x is None else f"{x / 1e6:,.1f}"


def _num(x: Any, fmt: str = "{:,.0f}") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _params(p: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in p.items()) or "-"


def summary_markdown(rows: list[dict[str, Any]]) -> str:
    """Per algo: QPS at recall >= 0.90 / 0.95 (batch and single), RAM, disk, build time."""
    good = measured(rows)
    head = ("| algo | QPS@.90 batch | QPS@.90 single | setting @.90 | QPS@.95 batch | QPS@.95 single | "
            "setting @.95 | max recall | RAM MB | disk MB | build s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for algo, pts in sorted(by_algo(good).items()):
        cells = [algo]
        for t in RECALL_THRESHOLDS:
            r = qps_at(pts, t)
            cells += [_num(r and r["qps_batch"]), _num(r and r["qps_single"]),
                      _params(r["params"]) if r else "not reached"]
        top = max(pts, key=lambda r: r["recall_at_10"])
        ram = max(r["ram_bytes"] or 0 for r in pts)
        cells += [f"{top['recall_at_10']:.3f}", _mb(ram), _mb(top["disk_bytes"]), _num(top["build_s"], "{:,.1f}")]
        lines.append("| " + " | ".join(cells) + " |")
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['algo']} | skipped: {r['skipped']} |" + " |" * (head.count("|") - 3))
    return "\n".join(lines)


def pareto_markdown(rows: list[dict[str, Any]]) -> str:
    """The Pareto points of each algo as a Markdown table, then the per-algo summary."""
    good = measured(rows)
    out = ["| algo | params | recall@10 | QPS batch | QPS single | p50 ms | p99 ms | RAM MB | disk MB | build s |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for algo, pts in sorted(by_algo(good).items()):
        for r in pareto(pts):
            out.append(f"| {algo} | {_params(r['params'])} | {r['recall_at_10']:.3f} | {_num(r['qps_batch'])} | "
                       f"{_num(r['qps_single'])} | {_num(r['p50_ms'], '{:.3f}')} | {_num(r['p99_ms'], '{:.3f}')} | "
                       f"{_mb(r['ram_bytes'])} | {_mb(r['disk_bytes'])} | {_num(r['build_s'], '{:,.1f}')} |")
    return "\n".join(out) + "\n\n" + summary_markdown(rows)


#: The recall a tenant run's per-bucket QPS is read at (the issue's "equal recall").
TENANT_RECALL = 0.90


def tenant_table(rows: Iterable[dict[str, Any]], qps_key: str = "qps_batch",
                 recall: float = TENANT_RECALL) -> dict[str, dict[tuple[float, float], dict[str, dict[str, Any]]]]:
    """dataset -> (lo, hi) bucket -> algo -> its fastest line reaching `recall` (algos that
    never reach it in a bucket are left out of it)."""
    out: dict[str, dict[tuple[float, float], dict[str, dict[str, Any]]]] = {}
    for r in measured(rows):
        if "tenant_fraction" not in r:
            continue
        cell = out.setdefault(r["dataset"], {}).setdefault(tuple(r["tenant_fraction"]), {})
        best = cell.get(r["algo"])
        if r["recall_at_10"] >= recall and r.get(qps_key) and (best is None or r[qps_key] > best[qps_key]):
            cell[r["algo"]] = r
    return out


def _pct(x: float) -> str:
    return f"{100 * x:g}%"


def plot_tenant_qps(rows: list[dict[str, Any]], path: Path, qps_key: str = "qps_batch",
                    recall: float = TENANT_RECALL) -> Path:
    """A PNG per results file: one panel per dataset, QPS at recall >= `recall` (log y) per
    tenant-size bucket (x, smallest tenants left), one line per algo."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.algos import OUR_KINDS

    table = tenant_table(rows, qps_key, recall)
    names = sorted(table)
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(6.5 * max(1, len(names)), 5.5), dpi=120,
                             squeeze=False)
    algos = sorted({a for d in table.values() for cell in d.values() for a in cell})
    for ax, name in zip(axes[0], names):
        buckets = sorted(table[name])
        for i, algo in enumerate(algos):
            xs = [j for j, b in enumerate(buckets) if algo in table[name][b]]
            ys = [table[name][buckets[j]][algo][qps_key] for j in xs]
            ours = algo in OUR_KINDS
            ax.plot(xs, ys, marker="osD^v<>"[i % 7], linewidth=2.6 if ours else 1.5,
                    color="black" if ours else None, label=f"{algo} (ours)" if ours else algo)
        ax.set_xticks(range(len(buckets)), [f"{_pct(lo)}-{_pct(hi)}" for lo, hi in buckets])
        ax.set_xlabel("tenant size (share of the base it sees)")
        ax.set_yscale("log")
        ax.set_ylabel(f"QPS at recall@10 >= {recall} ({qps_key}, log)")
        ax.set_title(name)
        ax.grid(True, which="both", linewidth=0.3, alpha=0.5)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def tenant_markdown(rows: list[dict[str, Any]], qps_key: str = "qps_batch", recall: float = TENANT_RECALL) -> str:
    """Per dataset and tenant-size bucket: each algo's QPS at recall >= `recall` (with the
    setting), curator's ratios to per-tenant-ivf and shared-ivf-filter, then RAM per algo."""
    table = tenant_table(rows, qps_key, recall)
    algos = sorted({a for d in table.values() for cell in d.values() for a in cell})
    head = "| dataset | tenant size | " + " | ".join(algos) + " | curator / per-tenant | curator / shared filter |"
    lines = [f"QPS ({qps_key}) at recall@10 >= {recall}; setting and recall below each", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    for name in sorted(table):
        for (lo, hi), cell in sorted(table[name].items()):
            cells = [name, f"{_pct(lo)}-{_pct(hi)}"]
            for a in algos:
                r = cell.get(a)
                cells.append(f"{r[qps_key]:,.0f} ({_params({k: v for k, v in r['params'].items()})}, "
                             f"{r['recall_at_10']:.3f})" if r else "not reached")
            for peer in ("per-tenant-ivf", "shared-ivf-filter"):
                c, p = cell.get("curator"), cell.get(peer)
                cells.append(f"{c[qps_key] / p[qps_key]:.2f}x" if c and p else "-")
            lines.append("| " + " | ".join(cells) + " |")
    ram: dict[tuple[str, str], int] = {}
    for r in measured(rows):
        if "tenant_fraction" in r:
            key = (r["dataset"], r["algo"])
            ram[key] = max(ram.get(key, 0), r.get("ram_bytes") or 0)
    lines += ["", "| dataset | algo | RAM MB | RAM / shared-ivf-filter |", "|---|---|---|---|"]
    for (name, algo), b in sorted(ram.items()):
        shared = ram.get((name, "shared-ivf-filter"))
        lines.append(f"| {name} | {algo} | {_mb(b)} | {f'{b / shared:.2f}x' if shared else '-'} |")
    skipped = sorted({f"{r['algo']}: {r['skipped']}" for r in rows if r.get("skipped")})
    lines += [f"skipped {s}" for s in skipped]
    return "\n".join(lines)
