"""Exact search with faiss: the ground truth the other kinds are measured against.

Tenant visibility and id filters run inside faiss through IDSelectors, so a filtered
search still returns the true top-k of what the caller may see.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import faiss
import numpy as np

from index.base import (
    check_dim_metric,
    MISSING_ID,
    IndexStats,
    Metric,
    SearchParams,
    SearchResult,
    check_ids,
    check_vectors,
    dir_size,
)

INDEX_FILE = "flat.faiss"
TENANTS_FILE = "tenants.json"


class FlatIndex:
    """Brute-force inner product / L2 over all vectors in RAM (faiss IndexFlat + id map)."""

    kind = "flat"

    def __init__(self, dim: int, metric: Metric = "ip") -> None:
        check_dim_metric(dim, metric)
        self.dim = dim
        self.metric: Metric = metric
        base = faiss.IndexFlatIP(dim) if metric == "ip" else faiss.IndexFlatL2(dim)
        self._index = faiss.IndexIDMap2(base)
        # Only restricted vectors are listed; every other id is public.
        self._tenants: dict[int, frozenset[str]] = {}
        self._saved_dir: Path | None = None

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def train(self, sample: np.ndarray) -> None:
        """Exact search learns nothing; the sample is only checked for its shape."""
        check_vectors(sample, self.dim, "sample")

    def add(self, ids: np.ndarray, vectors: np.ndarray, tenants: Sequence[Iterable[str]] | None = None) -> None:
        vectors = check_vectors(vectors, self.dim)
        ids = check_ids(ids, len(vectors))
        if tenants is not None and len(tenants) != len(ids):
            raise ValueError(f"tenants must have one entry per id ({len(ids)}), got {len(tenants)}")
        # Re-adding an id replaces it, so that upserts never leave two copies.
        self.remove(ids)
        self._index.add_with_ids(vectors, ids)
        if tenants is not None:
            for i, ts in zip(ids.tolist(), tenants):
                ts = frozenset(ts)
                if ts:
                    self._tenants[i] = ts

    def remove(self, ids: np.ndarray) -> int:
        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).ravel())
        if len(ids) == 0 or len(self) == 0:
            return 0
        for i in ids.tolist():
            self._tenants.pop(i, None)
        return int(self._index.remove_ids(faiss.IDSelectorBatch(ids)))

    def _selector(self, tenant: str | None, allowed_ids: np.ndarray | None):
        parts = []
        if self._tenants:
            hidden = [i for i, ts in self._tenants.items() if tenant is None or tenant not in ts]
            if hidden:
                parts.append(faiss.IDSelectorNot(faiss.IDSelectorBatch(np.asarray(hidden, np.int64))))
        if allowed_ids is not None:
            parts.append(faiss.IDSelectorBatch(np.ascontiguousarray(allowed_ids, dtype=np.int64)))
        if not parts:
            return None, []
        sel = parts[0]
        for p in parts[1:]:
            sel = faiss.IDSelectorAnd(sel, p)
        return sel, parts  # parts keep the Python-side selectors alive during the search

    def search(
        self,
        queries: np.ndarray,
        k: int,
        tenant: str | None = None,
        params: SearchParams | None = None,
        allowed_ids: np.ndarray | None = None,
    ) -> SearchResult:
        queries = check_vectors(queries, self.dim, "queries")
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        if len(self) == 0 or len(queries) == 0:
            return SearchResult.empty(len(queries), k)
        sel, _keep = self._selector(tenant, allowed_ids)
        search_params = faiss.SearchParameters(sel=sel) if sel is not None else None
        dist, ids = self._index.search(queries, k, params=search_params)
        scores = dist if self.metric == "ip" else -dist
        scores = np.where(ids == MISSING_ID, -np.inf, scores).astype(np.float32)
        return SearchResult(ids.astype(np.int64), scores)

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / (INDEX_FILE + ".tmp")
        faiss.write_index(self._index, str(tmp))
        tmp.replace(directory / INDEX_FILE)
        meta = {"dim": self.dim, "metric": self.metric,
                "tenants": {str(i): sorted(ts) for i, ts in self._tenants.items()}}
        tmp = directory / (TENANTS_FILE + ".tmp")
        tmp.write_text(json.dumps(meta))
        tmp.replace(directory / TENANTS_FILE)
        self._saved_dir = directory

    @classmethod
    def load(cls, directory: Path) -> "FlatIndex":
        directory = Path(directory)
        meta = json.loads((directory / TENANTS_FILE).read_text())
        index = cls(meta["dim"], meta["metric"])
        index._index = faiss.read_index(str(directory / INDEX_FILE))
        index._tenants = {int(i): frozenset(ts) for i, ts in meta["tenants"].items()}
        index._saved_dir = directory
        return index

    def stats(self) -> IndexStats:
        memory = len(self) * (self.dim * 4 + 8) + sum(64 + 32 * len(t) for t in self._tenants.values())
        disk = dir_size(self._saved_dir) if self._saved_dir is not None else 0
        return IndexStats(self.kind, len(self), self.dim, memory, disk, {"metric": self.metric})
