"""Learned binary codes against sign codes at equal bits, on real datasets (issue 6's goal).

    python -m bench.binary_quality --dataset data/wiki-minilm --dataset data/glove-50 \\
        --max-base 100000 --max-queries 1000 --out r.json

For each dataset and bits per dimension u (1, 2, 4) three codes of the same size (u x m bits,
m = the dim rounded up to 64) are compared, all scored on the same base and queries:

- sign: sign codes, Qdrant/faiss-style: the signs of x, then of u-1 random rotations of x
  (SimHash with u x m bits), ranked by Hamming distance; at 1 bit exactly sign(x);
- untrained: our recurrent binarizer at its default start (centred random rotation), no training;
- learned: our binarizer trained as `datastore build --index binary` trains it (its
  `train_stats` say which start won on held-out data and whether training beat it).

recall@10 against exact float search, at oversample 1 (the code top-10) and after rerank of
the code top-(10 x oversample) by the float inner product (oversample 4, 16). The binarizer
trains on a sample of the base (the queries are never seen). One JSON object to stdout.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import click
import numpy as np

OVERSAMPLES = (1, 4, 16)
K = 10


def _recall(found: np.ndarray, gt: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(g.tolist())) / gt.shape[1] for f, g in zip(found, gt)]))


def _rerank_recalls(scores: np.ndarray, base: np.ndarray, queries: np.ndarray, gt: np.ndarray) -> dict:
    from index import sdc

    top = sdc.top_n(scores, K * max(OVERSAMPLES))
    out = {}
    for os_ in OVERSAMPLES:
        cand = top[:, :K * os_]
        if os_ == 1:
            found = cand
        else:
            exact = np.einsum("qd,qkd->qk", queries, base[cand])
            found = np.take_along_axis(cand, np.argsort(-exact, 1, kind="stable")[:, :K], 1)
        out[f"recall@10_os{os_}"] = round(_recall(found, gt), 4)
    return out


def sign_codes(x: np.ndarray, bits: int, m: int, seed: int) -> np.ndarray:
    """(n, bits, W) codes: plane 0 = sign(x) (padded with rotated dims up to m), plane j a random rotation."""
    from index import sdc

    rng = np.random.default_rng(seed)
    d = x.shape[1]
    planes = []
    for j in range(bits):
        rows = []
        if j == 0:
            rows.append(x)
        need = m - (d if j == 0 else 0)
        while need > 0:
            q, _ = np.linalg.qr(rng.standard_normal((d, d)))
            rows.append((x @ q)[:, :need])
            need -= min(need, d)
        planes.append(np.concatenate(rows, 1)[:, :m])
    return sdc.pack(np.stack(planes, 1))


def run(datasets: list[Path], bits_list: list[int], max_base: int, max_queries: int, epochs: int,
        train_sample: int, seed: int) -> dict:
    from bench.datasets import exact_knn, load_dataset
    from index import sdc
    from index.binarizer import Binarizer, BinarizerConfig

    out = {"load_avg": os.getloadavg(), "k": K, "results": []}
    for path in datasets:
        ds = load_dataset(path, max_queries=max_queries)
        base, queries, gt = ds.base, ds.queries, ds.gt[:, :K]
        if len(base) > max_base:
            keep = np.sort(np.random.default_rng(seed).choice(len(base), max_base, replace=False))
            base = np.ascontiguousarray(base[keep])
            gt = exact_knn(base, queries, K, ds.metric)[:, :K]
        base = np.ascontiguousarray(base, np.float32)
        for bits in bits_list:
            row = {"dataset": ds.name, "n": len(base), "dim": ds.dim, "queries": len(queries), "bits": bits}
            cfg = BinarizerConfig(bits=bits, epochs=epochs, train_sample=train_sample, seed=seed)
            m = cfg.dims_for(ds.dim)[0]
            row["code_bits"] = bits * m
            sc = sign_codes(base, bits, m, seed)
            sq = sign_codes(queries, bits, m, seed)
            hamming = sdc.sdc_int(sq.reshape(len(sq), 1, -1), sdc.to_planes(sc.reshape(len(sc), 1, -1)), bits * m)
            row["sign"] = _rerank_recalls(hamming, base, queries, gt)
            untrained = Binarizer(ds.dim, cfg)
            untrained.fit(base[:MIN_UNTRAINED])  # below MIN_TRAIN_ROWS: centred random rotation only
            row["untrained"] = _codes_recalls(untrained, base, queries, gt)
            t = time.perf_counter()
            learned = Binarizer(ds.dim, cfg).fit(base, ds.metric)
            row["train_s"] = round(time.perf_counter() - t, 1)
            row["learned"] = _codes_recalls(learned, base, queries, gt)
            row["train_stats"] = learned.train_stats
            print(json.dumps(row), flush=True, file=__import__("sys").stderr)
            out["results"].append(row)
    out["load_avg_end"] = os.getloadavg()
    return out


MIN_UNTRAINED = 8


def _codes_recalls(binarizer, base: np.ndarray, queries: np.ndarray, gt: np.ndarray) -> dict:
    from index import sdc

    scores = sdc.sdc_int(binarizer.encode(queries), sdc.to_planes(binarizer.encode(base)), binarizer.m)
    return _rerank_recalls(scores, base, queries, gt)


@click.command()
@click.option("--dataset", "datasets", multiple=True, type=click.Path(path_type=Path), required=True)
@click.option("--bits", "bits_list", multiple=True, type=int, default=(1, 2, 4), show_default=True)
@click.option("--max-base", type=int, default=100_000, show_default=True)
@click.option("--max-queries", type=int, default=1000, show_default=True)
@click.option("--epochs", type=int, default=6, show_default=True)
@click.option("--train-sample", type=int, default=20_000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None)
def main(datasets, bits_list, max_base, max_queries, epochs, train_sample, seed, out) -> None:
    """Sign vs untrained vs learned binary codes at equal bits: recall@10 before/after rerank."""
    result = run(list(datasets), list(bits_list), max_base, max_queries, epochs, train_sample, seed)
    text = json.dumps(result, indent=1)
    if out:
        Path(out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
