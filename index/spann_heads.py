"""SPANN's head index: centroids by head id and a faiss index over the live ones.

Flat search up to `hnsw_threshold` heads, HNSW above (it cannot delete, so removed heads are
masked with an IDSelector until the next rebuild). Distances are squared L2.
"""

from __future__ import annotations

import faiss
import numpy as np


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
        return self._index.search(np.ascontiguousarray(queries, np.float32), n, params=params)

    def memory_bytes(self) -> int:
        graph = self.count * self.hnsw_m * 2 * 4 if self._hnsw else 0
        return self.vectors.nbytes + self.alive.nbytes + graph + len(self.vectors) * 8
