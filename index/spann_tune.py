"""Choosing SPANN's RNG factor at build time, from the training sample.

Why: how much closure replication pays depends on the data, and by a factor of 1.5 in
query time. On GloVe-50 (no clear clusters) a lax rule (factor 2.0, ~5.6 entries a vector)
reached recall .966 with 8 lists where the strict rule (1.0, ~1.3 entries) needed over 32 lists
of a quarter the size. On syn384 (a 4,096-cluster mixture cut into ~5 lists a cluster) the
strict rule kept 1.0 entries a vector against 2.1 at the same recall for each list count:
replicas within one cluster are read twice by a query that probes the whole cluster anyway,
and warm QPS rose 1.5x. So each candidate factor is tried on the sample itself.

How: some sample vectors act as queries, their exact neighbours among the rest of the sample
are found, and each candidate factor assigns those neighbours to heads. A neighbour is found
at the first of the query's probed lists that holds it, so the lists needed for recall
TARGET_RECALL follow; a list costs a fixed overhead plus its entries' floats (a list's
length grows with the factor's replication, estimated on a random part of the sample). The
cheapest factor wins; a tie goes to the smaller factor, which writes less."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np

from index.kmeans import omp_threads

log = logging.getLogger(__name__)

#: Factors tried: the strict rule of the paper, and laxer ones that replicate more.
CANDIDATES = (1.0, 1.5, 2.0)
#: The factor when the sample is too small to tell (the measured best on GloVe-50).
FALLBACK = 2.0
#: Fewer sample vectors than this: too few neighbours to tell factors apart.
MIN_SAMPLE = 10_000
QUERIES = 500
#: Neighbours are searched among at most this many sample vectors (read in place).
BASE_MOST = 200_000
REPLICATION_PROBE = 2_000
TARGET_RECALL = 0.95
#: A probed list's fixed cost in float reads (lookup, decode, per-list Python work; measured
#: ~10 us a list against ~0.5 ns a float on this machine's 2M warm scan).
LIST_OVERHEAD_FLOATS = 20_000


@dataclass(frozen=True)
class RngChoice:
    factor: float
    #: Estimated list entries a vector, and lists needed for TARGET_RECALL, by factor.
    replication: dict[float, float]
    lists_needed: dict[float, int]
    cost: dict[float, float]


def choose_rng_factor(sample: np.ndarray, total: int, heads: int, metric: str, max_lists: int,
                      search_heads: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
                      assign: Callable[[np.ndarray, float], list[np.ndarray]], seed: int = 0) -> RngChoice:
    """The candidate factor with the least estimated scan cost for `total` vectors over `heads`
    lists; `assign(vectors, factor)` gives each vector's heads under that factor."""
    if len(sample) < MIN_SAMPLE or heads < 2:
        return RngChoice(FALLBACK, {}, {}, {})
    rng = np.random.default_rng(seed)
    base = np.ascontiguousarray(sample[:BASE_MOST], np.float32)  # a view of the sample: no copy
    chosen = rng.choice(len(base), min(QUERIES, len(base) // 2), replace=False)
    queries = base[chosen]
    with omp_threads(None):  # faiss.knn reads the numpy arrays in place (an index would copy base)
        _, near = faiss.knn(queries, base, 11, faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2)
    # each query's 10 nearest other vectors (it finds itself first, bar exact duplicates)
    near = np.stack([row[row != q][:10] for row, q in zip(near, chosen)])
    probes = min(heads, max(max_lists, 64))
    _, probed = search_heads(queries, probes)  # each query's heads in probe order
    neighbours, where = np.unique(near.ravel(), return_inverse=True)
    spread = base[rng.choice(len(base), min(REPLICATION_PROBE, len(base)), replace=False)]
    replication, needed, cost = {}, {}, {}
    for factor in CANDIDATES:
        replication[factor] = float(np.mean([len(h) for h in assign(spread, factor)]))
        held = assign(base[neighbours], factor)
        found = np.full(near.size, probes, np.int32)
        for j, (q, n) in enumerate(zip(np.repeat(np.arange(len(queries)), 10).tolist(), where.tolist())):
            at = np.flatnonzero(np.isin(probed[q], held[n]))  # where the neighbour's lists come
            if len(at):
                found[j] = at[0]
        hits = np.sort(found)  # a neighbour is found once this many lists are probed, + 1
        at = min(len(hits) - 1, int(np.ceil(TARGET_RECALL * len(hits))) - 1)
        needed[factor] = int(hits[at]) + 1
        entries = total * replication[factor] / heads
        cost[factor] = needed[factor] * (LIST_OVERHEAD_FLOATS + entries * sample.shape[1])
    best = min(CANDIDATES, key=lambda f: (cost[f], f))
    log.info("spann: rng_factor %.2f chosen (lists for recall %.2f: %s; entries a vector: %s)", best,
             TARGET_RECALL, needed, {f: round(r, 2) for f, r in replication.items()})
    return RngChoice(best, replication, needed, cost)
