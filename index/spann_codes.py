"""What SPANN's posting lists hold per entry: float vectors, or binary codes reranked with floats.

With `codes="binary"` a list entry is the BEBR code of the vector (index/binarizer.py, m dims x
u bits, u x ceil(m / 64) uint64 words) instead of its floats: for GloVe-50 at 2 bits x 64 dims
16 bytes instead of 200, so a query reads about 1/8 of the bytes from its lists. The scan
scores codes by Symmetric Distance Calculation (index/sdc.py) and keeps the best
k x oversample distinct ids; those are reranked with their full-precision vectors, read by id
from the `vectors` database (the shard's, or the index's own when standalone).

Both encodings share one interface, so the scan, splits and merges never branch on it
beyond `exact` (whether scan scores are final) and `floats_of` (codes cannot give floats
back: a split or merge reads the vectors it clusters from the vectors database).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from index import sdc
from index.base import MISSING_ID, Metric
from index.storage import VectorStore

if TYPE_CHECKING:  # torch loads only when a binary-coded index trains or opens
    from index.binarizer import Binarizer


class FloatRows:
    """Entries hold the vectors themselves (float32 or float16): scan scores are exact."""

    exact = True

    def __init__(self, dim: int, dtype: str, metric: Metric) -> None:
        self.dim, self.dtype, self.metric = dim, np.dtype(dtype), metric
        self.width = dim

    @property
    def row_bytes(self) -> int:
        return self.dim * self.dtype.itemsize

    def encode(self, vectors: np.ndarray) -> np.ndarray:
        return np.asarray(vectors).astype(self.dtype, copy=False)

    def prepare(self, queries: np.ndarray) -> np.ndarray:
        return queries

    def score(self, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Similarities (Q, n) of prepared queries to one list's rows: one matrix product,
        so a list probed by several queries of a batch is read from memory once."""
        rows = rows.astype(np.float32, copy=False)
        if self.metric == "ip":
            return queries @ rows.T
        scores = 2.0 * (queries @ rows.T) - np.einsum("ij,ij->i", rows, rows)
        scores -= np.einsum("ij,ij->i", queries, queries)[:, None]
        return np.minimum(scores, 0, out=scores)  # minus squared distances: never above 0

    def score_into(self, query: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
        """One query's similarities to one list's rows, written into `out` (n,): a batch's
        lists are mostly probed by a single query, and a matrix-vector product into the
        score table skips a temporary and a copy."""
        if self.metric == "ip" and rows.dtype == np.float32:
            np.matmul(rows, query, out=out)
        else:
            out[:] = self.score(query[None], rows)[0]


class BinaryRows:
    """Entries hold BEBR codes, row-major (n, bits x words) uint64: scan scores rank candidates."""

    exact = False

    def __init__(self, binarizer: Binarizer) -> None:
        self.binarizer = binarizer
        self.bits, self.words, self.m = binarizer.bits, binarizer.words, binarizer.m
        self.width = self.bits * self.words
        self.dtype = np.dtype(np.uint64)

    @property
    def row_bytes(self) -> int:
        return 8 * self.width

    def encode(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.ascontiguousarray(vectors, np.float32)
        if not vectors.flags.writeable:  # torch warns on read-only buffers (decoded lists)
            vectors = vectors.copy()
        codes = self.binarizer.encode(vectors)
        return codes.reshape(len(codes), self.width)

    def prepare(self, queries: np.ndarray) -> np.ndarray:
        """The queries' codes (Q, bits, words): SDC binarizes both sides."""
        return self.binarizer.encode(queries)

    def score_into(self, query: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
        out[:] = self.score(query[None], rows)[0]

    def score(self, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Integer SDC scores (Q, n) of prepared query codes (Q, bits, words) against one list's codes."""
        planes = sdc.to_planes(rows.reshape(len(rows), self.bits, self.words))
        return sdc.sdc_int(queries, planes, self.m)

    def memory_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.binarizer.model.parameters())


def candidates_wanted(k: int, oversample: float) -> int:
    if not (math.isfinite(oversample) and oversample >= 1):
        raise ValueError(f"oversample must be >= 1, got {oversample}")
    return max(k, math.ceil(k * oversample))


def rerank(queries: np.ndarray, candidates: np.ndarray, vectors: VectorStore, metric: Metric,
           out_ids: np.ndarray, out_scores: np.ndarray) -> None:
    """Write each query's top-k (k = out_ids.shape[1]) of its candidate ids (Q, C; MISSING_ID
    pads) by exact float score. Each distinct candidate of the batch is read once."""
    valid = candidates != MISSING_ID
    if not valid.any():
        return
    uniq, inverse = np.unique(candidates[valid], return_inverse=True)
    found, floats = vectors.get(uniq)
    pos = np.zeros(candidates.shape, np.int64)
    pos[valid] = inverse
    v = floats[pos]
    if metric == "ip":
        scores = np.einsum("qnd,qd->qn", v, queries)
    else:
        scores = -((v - queries[:, None, :]) ** 2).sum(-1)
    scores = np.where(valid & found[pos], scores, -np.inf).astype(np.float32)
    k = out_ids.shape[1]
    top = sdc.top_n(scores, k)
    best = np.take_along_axis(scores, top, 1)
    keep = np.isfinite(best)
    out_ids[:, :top.shape[1]] = np.where(keep, np.take_along_axis(candidates, top, 1), MISSING_ID)
    out_scores[:, :top.shape[1]] = np.where(keep, best, -np.inf)
