"""Balanced k-means and the hierarchical head selection built on it (faiss does the k-means).

Balance matters for disk indexes: a query reads whole posting lists, so one oversized list
costs as much as many small ones. After faiss's k-means, points are reassigned under a
capacity (slack x the mean size), nearest-first, which keeps lists within that slack.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import faiss
import numpy as np

#: Below this much work (points x clusters x dims) k-means runs on one OpenMP thread: waking a
#: thread team costs more than it saves on a small problem (SPFresh's 2-means splits), and
#: far more when the cores are busy (measured: 0.4 s per 2-means of 50 points at load 20).
SMALL_WORK = 1 << 22


@contextmanager
def omp_threads(n: int | None) -> Iterator[None]:
    """Run faiss on n OpenMP threads in this thread (None: unchanged). OpenMP keeps the count
    per calling thread, so other threads are not affected."""
    if n is None:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def squared_distances(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """(n, k) squared L2 distances, computed as |x|^2 - 2 x.c + |c|^2 (BLAS)."""
    d = (x * x).sum(1)[:, None] - 2.0 * (x @ c.T) + (c * c).sum(1)[None, :]
    return np.maximum(d, 0.0, out=d)


def balanced_kmeans(x: np.ndarray, k: int, *, slack: float = 1.3, niter: int = 12,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(centroids (k, d), assignment (n,)) with every cluster at most ceil(slack * n / k)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if slack < 1.0:
        raise ValueError(f"slack must be >= 1, got {slack}")
    km = faiss.Kmeans(d, k, niter=niter, seed=seed, verbose=False, min_points_per_centroid=1,
                      max_points_per_centroid=max(256, math.ceil(n / k)))
    with omp_threads(1 if n * k * d < SMALL_WORK else None):
        km.train(x)
    dist = squared_distances(x, km.centroids)
    cap = math.ceil(slack * n / k)
    assign = np.full(n, -1, np.int64)
    counts = np.zeros(k, np.int64)
    open_ = np.ones(k, bool)
    todo = np.arange(n)
    while len(todo):
        masked = np.where(open_[None, :], dist[todo], np.inf)
        best = masked.argmin(1)
        bestd = masked[np.arange(len(todo)), best]
        # nearest-first: within each cluster, the closest points claim the free places
        order = np.lexsort((bestd, best))
        todo, best = todo[order], best[order]
        starts = np.searchsorted(best, np.arange(k))
        rank = np.arange(len(todo)) - starts[best]
        fits = rank < (cap - counts[best])
        assign[todo[fits]] = best[fits]
        counts += np.bincount(best[fits], minlength=k)
        open_ = counts < cap
        todo = todo[~fits]
    centroids = np.zeros((k, d), np.float32)
    np.add.at(centroids, assign, x)
    nonempty = counts > 0
    centroids[nonempty] /= counts[nonempty, None]
    centroids[~nonempty] = km.centroids[~nonempty]
    return centroids, assign


def hierarchical_heads(x: np.ndarray, leaf_size: int, *, branching: int = 16, slack: float = 1.3,
                       seed: int = 0) -> np.ndarray:
    """Centroids of the leaves of a balanced k-means tree whose leaves hold <= leaf_size points."""
    if leaf_size < 1:
        raise ValueError(f"leaf_size must be >= 1, got {leaf_size}")
    heads: list[np.ndarray] = []
    stack = [np.arange(len(x))]
    level_seed = seed
    while stack:
        idx = stack.pop()
        if len(idx) <= leaf_size:
            if len(idx):
                heads.append(x[idx].mean(0))
            continue
        k = max(2, min(branching, math.ceil(len(idx) / leaf_size)))
        level_seed += 1
        # the root is all of x: no copy of the whole training sample
        _, assign = balanced_kmeans(x if len(idx) == len(x) else x[idx], k, slack=slack, seed=level_seed)
        for c in range(k):
            part = idx[assign == c]
            if len(part) == len(idx):  # cannot split (identical points): keep as one leaf
                heads.append(x[part].mean(0))
            elif len(part):
                stack.append(part)
    return np.ascontiguousarray(np.stack(heads), dtype=np.float32)
