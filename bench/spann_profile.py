"""Warm single-thread SPANN vs faiss IVFFlat on one dataset, in one process (issue 4 profiling).

    python -m bench.spann_profile --dataset data/syn384-200k --n 100000 --nprobe 4 8 16 --ivf-nprobe 1 2 4 8
Prints one JSON line per point: algo, param, recall@10, batch QPS (1000-query batches) and
single-query QPS; `--profile` adds a cProfile of single queries for the first SPANN point.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import time

import numpy as np


def _time(fn, queries, batch):
    t = time.perf_counter()
    out = [fn(queries[i:i + batch]) for i in range(0, len(queries), batch)]
    return np.concatenate(out), len(queries) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--n", type=int, default=0)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--single", type=int, default=300)
    ap.add_argument("--nprobe", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--ivf-nprobe", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--config", default="{}", help="SpannConfig fields as JSON")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    import faiss
    faiss.omp_set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from bench.datasets import exact_knn, load_dataset, recall_at_k
    from index.base import SearchParams
    from index.spann import SpannIndex

    ds = load_dataset(args.dataset, compute_gt=not args.n, max_queries=args.queries)
    base = np.ascontiguousarray(ds.base[:args.n] if args.n else ds.base, np.float32)
    queries = np.ascontiguousarray(ds.queries[:args.queries], np.float32)
    metric = ds.metric
    gt = exact_knn(base, queries, 10, metric) if args.n else ds.gt[:len(queries)]
    load = os.getloadavg()[0]

    t = time.process_time()
    idx = SpannIndex(base.shape[1], metric, **json.loads(args.config))
    idx.train(base)
    idx.add(np.arange(len(base)), base)
    idx.search(queries[:1], 10)
    build = time.process_time() - t
    sizes = [len(b) for _, b in idx.store.items()]
    print(json.dumps({"algo": "spann", "build_cpu_s": round(build, 1), "heads": idx.heads.count,
                      "mean_list_bytes": int(np.mean(sizes)), "entries_per_vector":
                      round(sum(s - 8 for s in sizes) / (10 + idx._width * idx.rows.dtype.itemsize) / len(base), 2)}),
          flush=True)
    rows = []
    for nprobe in args.nprobe:
        p = SearchParams(nprobe=nprobe)
        fn = lambda q: idx.search(q, 10, params=p).ids  # noqa: E731
        fn(queries[:10])
        found, qps_b = _time(fn, queries, 1000)
        _, qps_s = _time(fn, queries[:args.single], 1)
        rows.append({"algo": "spann", "nprobe": nprobe, "recall": round(recall_at_k(found, gt), 4),
                     "qps_batch": round(qps_b), "qps_single": round(qps_s)})
        print(json.dumps(rows[-1]), flush=True)
    quant = faiss.IndexFlatIP(base.shape[1]) if metric == "ip" else faiss.IndexFlatL2(base.shape[1])
    ivf = faiss.IndexIVFFlat(quant, base.shape[1], args.nlist,
                             faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2)
    ivf.train(base[np.random.default_rng(0).choice(len(base), min(len(base), 50 * args.nlist), replace=False)])
    ivf.add(base)
    for nprobe in args.ivf_nprobe:
        ivf.nprobe = nprobe
        fn = lambda q: ivf.search(q, 10)[1]  # noqa: E731
        found, qps_b = _time(fn, queries, 1000)
        _, qps_s = _time(fn, queries[:args.single], 1)
        rows.append({"algo": "faiss-ivf", "nprobe": nprobe, "recall": round(recall_at_k(found, gt), 4),
                     "qps_batch": round(qps_b), "qps_single": round(qps_s)})
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"loadavg_start": round(load, 2), "loadavg_end": round(os.getloadavg()[0], 2)}))
    if args.profile:
        p = SearchParams(nprobe=args.nprobe[0])
        prof = cProfile.Profile()
        prof.enable()
        for q in queries[:200]:
            idx.search(q[None], 10, params=p)
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
