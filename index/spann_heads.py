"""SPANN's head index: centroids by head id and a faiss index over the live ones.

Flat search up to `hnsw_threshold` heads, HNSW above (it cannot delete, so removed heads are
masked with an IDSelector until the next rebuild). Distances are squared L2.
"""

from __future__ import annotations

import faiss
import numpy as np

from index.kmeans import SMALL_WORK, omp_threads


class HeadIndex:
    """Head centroids by head id, and a faiss index over the live ones (squared L2)."""

    def __init__(self, dim: int, hnsw_threshold: int, hnsw_m: int) -> None:
        self.dim, self.hnsw_threshold, self.hnsw_m = dim, hnsw_threshold, hnsw_m
        self.vectors = np.zeros((0, dim), np.float32)
        self.alive = np.zeros(0, bool)
        self._dead_in_index: set[int] = set()
        self._index = None
        self._hnsw = False

    def reset(self, vectors: np.ndarray, alive: np.ndarray | None = None) -> None:
        self.vectors = np.ascontiguousarray(vectors, np.float32)
        self.alive = np.ones(len(vectors), bool) if alive is None else alive.copy()
        self._rebuild()

    def _rebuild(self) -> None:
        live = np.flatnonzero(self.alive)
        self._hnsw = len(live) > self.hnsw_threshold
        if self._hnsw:
            inner = faiss.IndexHNSWFlat(self.dim, self.hnsw_m)
            inner.hnsw.efConstruction = 80
        else:
            inner = faiss.IndexFlatL2(self.dim)
        self._index = faiss.IndexIDMap2(inner)
        if len(live):
            self._index.add_with_ids(self.vectors[live], live.astype(np.int64))
        self._dead_in_index = set()

    @property
    def count(self) -> int:
        return int(self.alive.sum())

    def add(self, vectors: np.ndarray) -> np.ndarray:
        ids = np.arange(len(self.vectors), len(self.vectors) + len(vectors), dtype=np.int64)
        self.vectors = np.concatenate([self.vectors, vectors.astype(np.float32)])
        self.alive = np.concatenate([self.alive, np.ones(len(vectors), bool)])
        self._index.add_with_ids(np.ascontiguousarray(vectors, np.float32), ids)
        return ids

    def remove(self, head: int) -> None:
        self.alive[head] = False
        if self._hnsw:  # HNSW cannot delete: mask until the next rebuild
            self._dead_in_index.add(int(head))
            if len(self._dead_in_index) > 0.1 * max(1, self.count):
                self._rebuild()
        else:
            self._index.remove_ids(np.array([head], np.int64))

    def search(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        n = max(1, min(n, self.count))
        params = None
        if self._hnsw:
            sel = None
            if self._dead_in_index:
                sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.fromiter(self._dead_in_index, np.int64)))
            params = faiss.SearchParametersHNSW(efSearch=max(64, 2 * n))
            if sel is not None:
                params.sel = sel  # `sel` stays referenced here until the search returns
        small = len(queries) * (self.hnsw_m * 64 if self._hnsw else self.count) * self.dim < SMALL_WORK
        with omp_threads(1 if small else None):  # a few queries: a thread team costs more than it saves
            return self._index.search(np.ascontiguousarray(queries, np.float32), n, params=params)

    #: Up to this many candidate heads, a subset search is one exact distance product in numpy
    #: (a filtered faiss search, HNSW above all, loses its way when few heads qualify).
    SUBSET_EXACT = 16_384

    def search_subset(self, queries: np.ndarray, n: int, heads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(squared distances, head ids) of each query's n nearest among `heads` (live ids),
        nearest first; padded with (inf, -1) when fewer qualify."""
        heads = np.asarray(heads, np.int64)
        queries = np.ascontiguousarray(queries, np.float32)
        n = max(1, n)
        if len(heads) > self.SUBSET_EXACT:
            params = faiss.SearchParametersHNSW(efSearch=max(64, 2 * n)) if self._hnsw else faiss.SearchParameters()
            sel = faiss.IDSelectorBatch(heads)
            params.sel = sel  # `sel` stays referenced here until the search returns
            return self._index.search(queries, min(n, len(heads)), params=params)
        d = np.full((len(queries), n), np.inf, np.float32)
        ids = np.full((len(queries), n), -1, np.int64)
        if not len(heads):
            return d, ids
        c = self.vectors[heads]
        dist = (queries * queries).sum(1)[:, None] - 2.0 * (queries @ c.T) + (c * c).sum(1)[None, :]
        m = min(n, len(heads))
        part = np.argpartition(dist, m - 1, axis=1)[:, :m] if m < len(heads) else np.tile(np.arange(m), (len(queries), 1))
        pd = np.take_along_axis(dist, part, 1)
        order = np.argsort(pd, axis=1, kind="stable")
        d[:, :m] = np.maximum(np.take_along_axis(pd, order, 1), 0)
        ids[:, :m] = heads[np.take_along_axis(part, order, 1)]
        return d, ids

    def memory_bytes(self) -> int:
        graph = self.count * self.hnsw_m * 2 * 4 if self._hnsw else 0
        return self.vectors.nbytes + self.alive.nbytes + graph + len(self.vectors) * 8


#: Lloyd refinement trains on at most this many sample points per head (faiss subsamples).
REFINE_POINTS_PER_HEAD = 64


def refine_heads(sample: np.ndarray, heads: np.ndarray, iters: int, seed: int = 0) -> np.ndarray:
    """Heads moved by `iters` unbalanced Lloyd iterations over `sample`, from `heads`.

    Why: a balanced tree's cap splits natural clusters, so a query's neighbours spread over
    several lists; a few free iterations move the heads back onto the clusters. Posting-length
    balance is then kept by the index's max_posting split rather than by the clustering."""
    sample = np.ascontiguousarray(sample, np.float32)
    km = faiss.Kmeans(sample.shape[1], len(heads), niter=iters, seed=seed,
                      max_points_per_centroid=REFINE_POINTS_PER_HEAD, min_points_per_centroid=1)
    with omp_threads(1 if len(sample) * len(heads) * sample.shape[1] < SMALL_WORK else None):
        km.train(sample, init_centroids=np.ascontiguousarray(heads, np.float32))
    return np.ascontiguousarray(km.centroids, np.float32)
