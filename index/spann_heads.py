"""SPANN's head index: centroids by head id and a faiss index over the live ones.

Flat search up to `flat_max` heads; above, an inverted file over the heads (faiss IVFFlat,
~16 sqrt(heads) coarse cells, `nprobe` of them scanned). Why not HNSW (SPTAG uses a graph):
on syn384, a 4,096-cluster mixture, an HNSW graph over 5k heads found a query's right head
8% of the time whatever efSearch (near-equidistant clusters leave greedy search nowhere to
go), and 79% over 20k heads.

Why spherical cells for unit-norm data ("ip"): heads are means, shorter than the vectors,
and an L2 k-means centroid of many of them is shorter still, so it lies near everything.
Over syn384's 20k heads, L2 cells were 27x the mean size at the largest and a query's 16
cells held 5.6k heads (334 us a query, 99.3% of nearest heads found); cells of spherical
k-means are even (largest 2x) and 2,264 of them with 64 probed find 99.7% scanning ~570
heads (115 us). Distances are squared L2 either way; only the cells differ.
"""

from __future__ import annotations

import faiss
import numpy as np

from index.kmeans import SMALL_WORK, omp_threads


class HeadIndex:
    """Head centroids by head id, and a faiss index over the live ones (squared L2)."""

    #: Coarse cells per sqrt(live heads): ~9 heads a cell at 20k heads.
    CELLS_PER_SQRT = 16

    def __init__(self, dim: int, flat_max: int, nprobe: int, spherical: bool = False) -> None:
        self.dim, self.flat_max, self.nprobe, self.spherical = dim, flat_max, nprobe, spherical
        self.vectors = np.zeros((0, dim), np.float32)
        self.alive = np.zeros(0, bool)
        self._index = None
        self._ivf: faiss.IndexIVFFlat | None = None
        self._built_for = 0

    def reset(self, vectors: np.ndarray, alive: np.ndarray | None = None, cells: np.ndarray | None = None) -> None:
        """Heads by id; `cells`: coarse centroids kept from an earlier build (a save), so an
        open skips their k-means (~10 s at 20k heads)."""
        self.vectors = np.ascontiguousarray(vectors, np.float32)
        self.alive = np.ones(len(vectors), bool) if alive is None else alive.copy()
        self._rebuild(cells)

    @property
    def cells(self) -> np.ndarray | None:
        """The coarse centroids of the inverted file (None while the search is flat)."""
        if self._ivf is None:
            return None
        return faiss.downcast_index(self._ivf.quantizer).reconstruct_n(0, self._ivf.nlist)

    def _rebuild(self, cells: np.ndarray | None = None) -> None:
        live = np.flatnonzero(self.alive)
        self._built_for = len(live)
        self._ivf = None
        if len(live) > self.flat_max:
            if cells is None or cells.ndim != 2 or cells.shape[1] != self.dim or not len(cells):
                count = max(1, min(len(live) // 2, int(self.CELLS_PER_SQRT * np.sqrt(len(live)))))
                km = faiss.Kmeans(self.dim, count, niter=10, seed=1234, spherical=self.spherical,
                                  min_points_per_centroid=1)  # few heads per cell is the point here
                with omp_threads(None):
                    km.train(self.vectors[live])
                cells = km.centroids
            # spherical: a head's cell is the centroid of largest inner product (unit centroids)
            quantizer = faiss.IndexFlatIP(self.dim) if self.spherical else faiss.IndexFlatL2(self.dim)
            quantizer.add(np.ascontiguousarray(cells, np.float32))
            self._ivf = faiss.IndexIVFFlat(quantizer, self.dim, len(cells), faiss.METRIC_L2)
            self._ivf.is_trained = True
            self._index = self._ivf
        else:
            self._index = faiss.IndexIDMap2(faiss.IndexFlatL2(self.dim))
        if len(live):
            self._index.add_with_ids(self.vectors[live], live.astype(np.int64))

    @property
    def count(self) -> int:
        return int(self.alive.sum())

    def add(self, vectors: np.ndarray) -> np.ndarray:
        ids = np.arange(len(self.vectors), len(self.vectors) + len(vectors), dtype=np.int64)
        self.vectors = np.concatenate([self.vectors, vectors.astype(np.float32)])
        self.alive = np.concatenate([self.alive, np.ones(len(vectors), bool)])
        if (self._ivf is None) != (self.count <= self.flat_max) or self.count > 2 * self._built_for:
            self._rebuild()  # crossed the flat limit, or grown past what the cells were trained for
        else:
            self._index.add_with_ids(np.ascontiguousarray(vectors, np.float32), ids)
        return ids

    def remove(self, head: int) -> None:
        self.alive[head] = False
        self._index.remove_ids(np.array([head], np.int64))

    def _params(self, sel: faiss.IDSelector | None = None) -> faiss.SearchParameters | None:
        if self._ivf is not None:
            params = faiss.SearchParametersIVF(nprobe=min(self.nprobe, self._ivf.nlist))
        elif sel is not None:
            params = faiss.SearchParameters()
        else:
            return None
        if sel is not None:
            params.sel = sel  # the caller keeps `sel` referenced until the search returns
        return params

    def _scanned(self) -> int:
        """Heads one query's search compares (cells and heads of the cells probed)."""
        if self._ivf is None:
            return self.count
        return self._ivf.nlist + self.count * min(self.nprobe, self._ivf.nlist) // self._ivf.nlist

    def search(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        n = max(1, min(n, self.count))
        small = len(queries) * self._scanned() * self.dim < SMALL_WORK
        with omp_threads(1 if small else None):  # a few queries: a thread team costs more than it saves
            return self._index.search(np.ascontiguousarray(queries, np.float32), n, params=self._params())

    #: Up to this many candidate heads, a subset search is one exact distance product in numpy
    #: (a filtered faiss search loses heads when few of a probed cell's heads qualify).
    SUBSET_EXACT = 16_384

    def search_subset(self, queries: np.ndarray, n: int, heads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(squared distances, head ids) of each query's n nearest among `heads` (live ids),
        nearest first; padded with (inf, -1) when fewer qualify."""
        heads = np.asarray(heads, np.int64)
        queries = np.ascontiguousarray(queries, np.float32)
        n = max(1, n)
        if len(heads) > self.SUBSET_EXACT:
            sel = faiss.IDSelectorBatch(heads)
            return self._index.search(queries, min(n, len(heads)), params=self._params(sel))
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
        cells = self._ivf.nlist * self.dim * 4 if self._ivf is not None else 0
        return 2 * self.vectors.nbytes + self.alive.nbytes + cells + len(self.vectors) * 8


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
