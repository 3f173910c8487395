"""Peers of the binary (BEBR) index: the compressed-code baselines it must beat.

- `sign-binary`: 1 bit per dimension, sign(x), scanned by faiss IndexBinaryFlat (Hamming):
  the quantization Qdrant, Weaviate and Milvus (BIN_*) offer, with their rescoring.
- `faiss-ivfpq`: faiss IVF-PQ (OPQ-rotated) at `code_bytes` bytes per vector, to set beside
  our codes at equal bytes.

Both rerank their top k x oversample candidates exactly as ours does, with the same float
store and rerank code (index.binary.FloatStore and rerank over a private LMDB), so a
comparison differs only in the codes and the scan.

To register them (bench/algos.py): add `SignBinary` and `FaissIVFPQ` to PEERS, and GRIDS to
DEFAULT_GRIDS.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from bench.adapter import Adapter, require

_FAISS_INSTALL = "pip install faiss-cpu"

#: Default grids, to merge into bench.algos.DEFAULT_GRIDS (equal bytes: 8, 16, 32 = our 1, 2, 4
#: bits x 64 dims).
GRIDS: dict[str, dict[str, list[Any]]] = {
    "sign-binary": {"oversample": [1, 2, 4, 8, 16, 32]},
    "faiss-ivfpq": {"nlist": [1024], "code_bytes": [8, 16, 32], "nprobe": [32], "oversample": [1, 4, 16, 32]},
}


def _faiss():
    return require("faiss", _FAISS_INSTALL)


class _Reranked(Adapter):
    """A faiss index over codes plus the float vectors, in a private LMDB, that rerank reads."""

    file_name = "index.faiss"
    vectors_dir = "vectors"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._index = None
        self._store = None
        self._floats = None

    @classmethod
    def check_available(cls) -> None:
        _faiss()

    def _write_floats(self, base: np.ndarray) -> None:
        from index.binary import FloatStore
        from index.storage import LmdbBlobStore

        store = LmdbBlobStore.open(self.workdir / self.vectors_dir)
        try:
            FloatStore(store, self.dim).put(np.arange(len(base), dtype=np.int64), base)
        finally:
            store.close()

    def _open_floats(self) -> None:
        from index.binary import FloatStore
        from index.storage import LmdbBlobStore

        self._store = LmdbBlobStore.open(self.workdir / self.vectors_dir)
        self._floats = FloatStore(self._store, self.dim)

    @abstractmethod
    def _candidates(self, queries: np.ndarray, n: int, params: dict[str, Any]) -> np.ndarray:
        """Ids (Q, n) of the top n by codes, -1 where fewer."""

    def search(self, queries: np.ndarray, k: int, params: dict[str, Any], tenant: str | None = None) -> np.ndarray:
        from index.binary import rerank

        oversample = float(params.get("oversample", 8))
        if not oversample >= 1:
            raise ValueError(f"oversample must be >= 1, got {oversample}")
        queries = np.ascontiguousarray(queries, np.float32)
        candidates = self._candidates(queries, max(k, math.ceil(k * oversample)), params)
        return rerank(queries, candidates.astype(np.int64, copy=False), self._floats, self.metric, k).ids

    def close(self) -> None:
        self._index = None
        if self._store is not None:
            self._store.close()
        self._store = self._floats = None

    def index_files(self) -> list[Path]:
        return [self.workdir / self.file_name, self.workdir / self.vectors_dir]


class SignBinary(_Reranked):
    """sign(x) codes, Hamming top k x oversample with faiss, float rerank."""

    name = "sign-binary"
    search_keys = ("oversample",)

    def _codes(self, x: np.ndarray) -> np.ndarray:
        return np.packbits(x > 0, axis=1)  # zero-padded to whole bytes: padding never differs

    def build(self, base: np.ndarray, params: dict[str, Any], tenants: list[list[str]] | None = None) -> None:
        faiss = _faiss()
        index = faiss.IndexBinaryFlat(8 * math.ceil(self.dim / 8))
        index.add(self._codes(base))
        self.workdir.mkdir(parents=True, exist_ok=True)
        faiss.write_index_binary(index, str(self.workdir / self.file_name))
        self._write_floats(base)

    def load(self, params: dict[str, Any]) -> None:
        self._index = _faiss().read_index_binary(str(self.workdir / self.file_name))
        self._open_floats()

    def _candidates(self, queries: np.ndarray, n: int, params: dict[str, Any]) -> np.ndarray:
        return self._index.search(self._codes(queries), n)[1]


class FaissIVFPQ(_Reranked):
    """OPQ + IVF + PQ with `code_bytes` one-byte sub-quantizers, float rerank."""

    name = "faiss-ivfpq"
    build_keys = ("nlist", "code_bytes")
    search_keys = ("nprobe", "oversample")

    def build(self, base: np.ndarray, params: dict[str, Any], tenants: list[list[str]] | None = None) -> None:
        faiss = _faiss()
        m = int(params.get("code_bytes", 16))
        rotated = m * math.ceil(self.dim / m)  # OPQ pads the dimension to a multiple of m
        metric = faiss.METRIC_INNER_PRODUCT if self.metric == "ip" else faiss.METRIC_L2
        index = faiss.index_factory(self.dim, f"OPQ{m}_{rotated},IVF{int(params.get('nlist', 1024))},PQ{m}", metric)
        index.train(base)
        index.add(base)
        self.workdir.mkdir(parents=True, exist_ok=True)
        faiss.write_index(index, str(self.workdir / self.file_name))
        self._write_floats(base)

    def load(self, params: dict[str, Any]) -> None:
        self._index = _faiss().read_index(str(self.workdir / self.file_name))
        self._open_floats()

    def _candidates(self, queries: np.ndarray, n: int, params: dict[str, Any]) -> np.ndarray:
        _faiss().extract_index_ivf(self._index).nprobe = int(params.get("nprobe", 32))
        return self._index.search(queries, n)[1]


PEERS: tuple[type[Adapter], ...] = (SignBinary, FaissIVFPQ)
